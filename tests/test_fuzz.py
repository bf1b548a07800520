"""Property-based fuzzing of every request message of both services (issue 8).

One in-process daemon per module serves ``mlp`` and ``two_io`` (whose results
must not change) and ``victim`` (a second copy of mlp that takes every fuzzed
weight operation: uploads, swaps, rollbacks, frees, blobs). Hypothesis sends
well over 2,000 generated requests per service: random dtypes, shapes, byte
lengths, names, chunk orders and offsets, paths. Every answer must be a proper
status code (never UNKNOWN, INTERNAL or a dropped connection); afterwards the
daemon is SERVING, the fixed inputs give bit-identical results, no upload is
left holding staging memory, and request metrics did not grow a label per
fuzzed model name.

The OIP messages come from the server's private descriptor pool (the same
compiled descriptor as ``aotiserve.oip.inference_pb2``): neither that module nor
tritonclient is imported here, so this file runs beside test_oip.py.
"""

from __future__ import annotations

import collections
import os

import grpc
import model_zoo
import pytest
import torch
import wire
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oip_messages import OipStub, ipb
from server_harness import running_server

from aotiserve.server import tensor_codec as codec
from aotiserve.v1 import model_runner_pb2 as pb

pytestmark = pytest.mark.slow

# Per test: how many generated requests. Native and OIP each sum to > 2,000.
SCALE = float(os.environ.get("AOTISERVE_FUZZ_SCALE", "1"))


def _n(k: int) -> int:
    return max(10, int(k * SCALE))


FUZZ = dict(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

# A proper answer to hostile input. INTERNAL, UNKNOWN, DEADLINE_EXCEEDED or CANCELLED
# (a crashed handler, a hang, a dropped stream) fail the test.
PROPER = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
SERVED = ("mlp", "two_io")
PROTECTED = SERVED + ("victim",)
TIMEOUT = 30.0
SENT: collections.Counter = collections.Counter()  # requests per service
LOADED_NAMES: set = set()  # names a (possibly failed) load was asked for


class Env:
    pass


@pytest.fixture(scope="module")
def env():
    # Few HTTP/2 streams per connection: a stream the server leaves open shows up soon.
    streams = int(os.environ.get("AOTISERVE_FUZZ_STREAMS", "16"))
    with running_server(
        list(SERVED), max_message_bytes=4 << 20, max_concurrent_streams=streams
    ) as srv:
        e = Env()
        e.srv = srv
        e.stub = srv.stub
        e.oip = OipStub(srv.channel)
        e.health = health_pb2_grpc.HealthStub(srv.channel)
        e.raw_run = srv.channel.unary_unary("/aotiserve.v1.ModelRunner/Run")
        e.raw_upload = srv.channel.stream_unary("/aotiserve.v1.ModelRunner/UpdateConstantBuffer")
        srv.stub.LoadModel(pb.LoadModelRequest(name="victim", path=str(srv.repo / "mlp.pt2")))
        e.constants = {n: t for n, t in wire.extract(srv.stub, "victim").items()}
        fqns = dict(
            srv.stub.GetConstantNamesToOriginalFqns(
                pb.GetConstantNamesToOriginalFqnsRequest(model="victim")
            ).fqns
        )
        e.constant_names = list(fqns)
        # Any wire name (FQN or constant name) -> the constant's current tensor.
        e.by_any_name = dict(e.constants)
        e.by_any_name.update({n: e.constants[f] for n, f in fqns.items() if f in e.constants})
        # Files below an allowed root that are not what they claim to be.
        junk = os.urandom(4096)
        (srv.repo / "junk.pt2").write_bytes(junk)
        (srv.repo / "junk.blob").write_bytes(junk)
        (srv.repo / "empty.blob").write_bytes(b"")
        (srv.repo / "escape.pt2").symlink_to("/etc/passwd")
        (srv.repo / "sub").mkdir()
        e.paths = [
            str(srv.repo / "junk.pt2"),
            str(srv.repo / "junk.blob"),
            str(srv.repo / "empty.blob"),
            str(srv.repo / "escape.pt2"),
            str(srv.repo / "sub"),
            str(srv.repo),
            str(srv.repo / "nope.pt2"),
            str(srv.repo / ".." / "mlp.pt2"),
            str(srv.repo / "sub" / ".." / ".." / "x"),
            "/etc/passwd",
            "/",
            ".",
            "..",
            "",
            "relative/../../etc/passwd",
            "/proc/self/mem",
            "/dev/zero",
            str(srv.repo / "mlp.pt2"),
            str(srv.repo / ("a" * 300)),
            str(srv.repo / "/".join(["sub"] * 2000)),
        ]
        e.golden_inputs = {m: model_zoo.MODELS[m].inputs(3, seed=7) for m in SERVED}
        e.golden = {m: _run_outputs(e, m) for m in SERVED}
        yield e
        # The daemon survived everything and serves exactly what it served before.
        status = e.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _run_outputs(e, model):
    resp = e.stub.Run(wire.run_request(model, e.golden_inputs[model]), timeout=TIMEOUT)
    return wire.outputs(resp)


def _call(e, service: str, fn, *args, **kw):
    """Sends one request; returns the status code, failing on an improper one."""
    SENT[service] += 1
    try:
        result = fn(*args, timeout=TIMEOUT, **kw)
        if hasattr(result, "__next__"):  # server stream: drain it
            for _ in result:
                pass
        code = grpc.StatusCode.OK
        details = ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    # A name that a fuzzed load registered as FAILED is UNAVAILABLE (the error table's
    # "not ready"): proper.
    failed_model = code == grpc.StatusCode.UNAVAILABLE and "failed to load" in (details or "")
    assert code in PROPER or failed_model, f"{service}: {code} {details!r}"
    return code


# ---------------------------------------------------------------- strategies

WIRE_DTYPES = sorted(codec.TORCH_DTYPE_BY_WIRE)
odd_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=24)
names = st.one_of(
    st.sampled_from(
        [
            "mlp",
            "two_io",
            "victim",
            "",
            "nope",
            "../mlp",
            "mlp\0",
            "MLP",
            " mlp",
            "mlp/..",
            ".",
            "..",
            "a" * 300,
        ]
    ),
    odd_text,
)
mutable_names = names.filter(lambda n: n not in SERVED)
huge = st.sampled_from([1 << 31, 1 << 32, 1 << 40, (1 << 63) - 1, -(1 << 63), -1])
dim = st.one_of(st.integers(0, 70), st.integers(-3, 1 << 12), huge)
shape = st.lists(dim, max_size=5) | st.lists(st.integers(0, 2), min_size=6, max_size=40)
dtype = st.one_of(
    st.sampled_from(WIRE_DTYPES), st.integers(-5, 40), st.integers(-(1 << 31), (1 << 31) - 1)
)


@st.composite
def wire_tensor(draw, exact_bias=0.6):
    d = draw(dtype)
    s = draw(shape)
    t = codec.TORCH_DTYPE_BY_WIRE.get(d)
    numel = 1
    for x in s:
        numel *= x
    exact = t is not None and 0 <= numel * t.itemsize <= 1 << 16 and all(x >= 0 for x in s)
    if exact and draw(st.floats(0, 1)) < exact_bias:
        n = numel * t.itemsize
        data = draw(st.binary(min_size=n, max_size=n)) if n <= 512 else os.urandom(n)
    else:
        data = draw(st.binary(max_size=600))
    return pb.Tensor(dtype=d, shape=s, data=data)


@st.composite
def plausible_inputs(draw, model):
    """The model's own dtypes and ranks, a random batch (0 and > the guard included),
    random bytes (NaN, inf, out-of-range embedding ids)."""
    batch = draw(st.one_of(st.integers(0, 8), st.sampled_from([255, 256, 257, 1024, 1025])))
    ex = model_zoo.MODELS["mlp" if model == "victim" else model].inputs(1)
    out = []
    for x in ex:
        shp = [batch, *x.shape[1:]]
        if draw(st.booleans()) and len(shp) > 1:
            shp[-1] = draw(st.integers(0, 80))
        n = codec.numel_of(shp) * x.dtype.itemsize
        out.append(pb.Tensor(dtype=codec.wire_dtype(x.dtype), shape=shp, data=os.urandom(n)))
    return out


run_requests = st.one_of(
    st.builds(pb.RunRequest, model=names, inputs=st.lists(wire_tensor(), max_size=4)),
    st.sampled_from(SERVED + ("victim",)).flatmap(
        lambda m: plausible_inputs(m).map(lambda ins: pb.RunRequest(model=m, inputs=ins))
    ),
)


# ---------------------------------------------------------------- native service


@settings(max_examples=_n(700), **FUZZ)
@given(req=run_requests)
def test_fuzz_run(env, req):
    _call(env, "native", env.stub.Run, req)


describe_requests = st.one_of(
    st.builds(pb.GetCallSpecRequest, model=names).map(lambda r: ("GetCallSpec", r)),
    st.builds(pb.GetConstantNamesToOriginalFqnsRequest, model=names).map(
        lambda r: ("GetConstantNamesToOriginalFqns", r)
    ),
    st.builds(pb.GetConstantNamesToDtypesRequest, model=names).map(
        lambda r: ("GetConstantNamesToDtypes", r)
    ),
    st.just(("ListModels", pb.ListModelsRequest())),
    st.builds(
        pb.ExtractConstantsMapRequest,
        model=names,
        use_inactive=st.booleans(),
        chunk_bytes=st.one_of(
            st.just(0), st.integers(64, 1 << 14), huge, st.integers(-(1 << 63), -1)
        ),
    ).map(lambda r: ("ExtractConstantsMap", r)),
)


@settings(max_examples=_n(300), **FUZZ)
@given(item=describe_requests)
def test_fuzz_describe_and_extract(env, item):
    method, req = item
    _call(env, "native", getattr(env.stub, method), req)


@st.composite
def upload_stream(draw, env):
    """A header (mostly naming real constants) then chunks: partitions of each
    constant's bytes, shuffled, sometimes shifted, truncated, duplicated or extra."""
    consts = env.constants
    real = sorted(consts)
    model = draw(st.one_of(st.just("victim"), st.just("victim"), mutable_names))
    picked = draw(st.lists(st.sampled_from(real + env.constant_names), unique=True, max_size=6))
    specs = []
    for name in picked:
        t = env.by_any_name.get(name)
        if t is None:
            t = consts["fc1.bias"]
        dt_ = codec.wire_dtype(t.dtype)
        shp = list(t.shape)
        if draw(st.floats(0, 1)) < 0.15:
            dt_ = draw(dtype)
        if draw(st.floats(0, 1)) < 0.15:
            shp = draw(shape)
        specs.append(pb.TensorSpec(name=name, dtype=dt_, shape=shp))
    if draw(st.floats(0, 1)) < 0.2:
        specs.append(pb.TensorSpec(name=draw(odd_text), dtype=draw(dtype), shape=draw(shape)))
    header = pb.UpdateConstantBufferHeader(
        model=model,
        use_inactive=draw(st.floats(0, 1)) < 0.8,
        validate_full_updates=draw(st.booleans()),
        user_managed=draw(st.booleans()),
        constants=specs,
        description=draw(odd_text),
    )
    msgs = []
    if draw(st.floats(0, 1)) > 0.05:
        msgs.append(pb.UpdateConstantBufferRequest(header=header))
    chunks = []
    for spec in specs:
        t = env.by_any_name.get(spec.name)
        size = t.numel() * t.element_size() if t is not None else draw(st.integers(0, 256))
        cuts = sorted(set(draw(st.lists(st.integers(0, max(size, 0)), max_size=5))) | {0, size})
        for a, b in zip(cuts, cuts[1:]):
            off = a
            if draw(st.floats(0, 1)) < 0.08:
                off = draw(st.one_of(st.integers(-8, size + 8), huge))
            n = b - a
            if draw(st.floats(0, 1)) < 0.08:
                n = max(0, n + draw(st.integers(-4, 4)))
            chunks.append(pb.ConstantChunk(name=spec.name, offset=off, data=os.urandom(n)))
        if size == 0:
            chunks.append(pb.ConstantChunk(name=spec.name, offset=0, data=b""))
    if chunks and draw(st.floats(0, 1)) < 0.1:
        chunks.append(draw(st.sampled_from(chunks)))  # duplicate
    if chunks and draw(st.floats(0, 1)) < 0.1:
        chunks.pop(draw(st.integers(0, len(chunks) - 1)))  # missing
    if draw(st.floats(0, 1)) < 0.1:
        chunks.append(
            pb.ConstantChunk(
                name=draw(odd_text), offset=draw(dim), data=draw(st.binary(max_size=64))
            )
        )
    chunks = draw(st.permutations(chunks)) if len(chunks) < 40 else chunks
    msgs.extend(pb.UpdateConstantBufferRequest(chunk=c) for c in chunks)
    if draw(st.floats(0, 1)) < 0.05:
        msgs.insert(draw(st.integers(0, len(msgs))), pb.UpdateConstantBufferRequest(header=header))
    if draw(st.floats(0, 1)) < 0.03:
        msgs.insert(draw(st.integers(0, len(msgs))), pb.UpdateConstantBufferRequest())
    return msgs


weight_ops = st.one_of(
    st.builds(pb.SwapConstantBufferRequest, model=st.one_of(st.just("victim"), mutable_names)).map(
        lambda r: ("SwapConstantBuffer", r)
    ),
    st.builds(
        pb.RollbackConstantBufferRequest, model=st.one_of(st.just("victim"), mutable_names)
    ).map(lambda r: ("RollbackConstantBuffer", r)),
    st.builds(
        pb.FreeInactiveConstantBufferRequest, model=st.one_of(st.just("victim"), mutable_names)
    ).map(lambda r: ("FreeInactiveConstantBuffer", r)),
    st.builds(
        pb.ExtractConstantsMapRequest, model=st.just("victim"), use_inactive=st.booleans()
    ).map(lambda r: ("ExtractConstantsMap", r)),
)


@settings(max_examples=_n(500), **FUZZ)
@given(data=st.data())
def test_fuzz_upload_and_weight_lifecycle(env, data):
    """Uploads interleaved with swap/rollback/free/extract in random order on ``victim``."""
    if data.draw(st.floats(0, 1)) < 0.6:
        msgs = data.draw(upload_stream(env))
        _call(env, "native", env.stub.UpdateConstantBuffer, iter(msgs))
    else:
        method, req = data.draw(weight_ops)
        _call(env, "native", getattr(env.stub, method), req)


@settings(max_examples=_n(150), **FUZZ)
@given(model=st.one_of(st.just("victim"), mutable_names), path_i=st.integers(0, 100), path=odd_text)
def test_fuzz_update_from_blob(env, model, path_i, path):
    p = env.paths[path_i] if path_i < len(env.paths) else path
    code = _call(
        env,
        "native",
        env.stub.UpdateConstantBufferFromBlob,
        pb.UpdateConstantBufferFromBlobRequest(model=model, weights_path=p),
    )
    if p in ("/etc/passwd", "/", "/proc/self/mem", "/dev/zero", str(env.srv.repo / "escape.pt2")):
        assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND), p


@settings(max_examples=_n(250), **FUZZ)
@given(
    name=names,
    path_i=st.integers(0, 60),
    path=odd_text,
    devices=st.lists(
        st.one_of(st.sampled_from(["cpu", "cuda:0", "cuda:7", "", "meta", "mps"]), odd_text),
        max_size=3,
    ),
    runners=st.one_of(st.integers(-3, 3), st.sampled_from([-(1 << 31), (1 << 31) - 1, 1 << 20])),
    package_model=st.one_of(st.just(""), odd_text),
)
def test_fuzz_load_model(env, name, path_i, path, devices, runners, package_model):
    p = env.paths[path_i] if path_i < len(env.paths) else path
    if p == str(env.srv.repo / "mlp.pt2") and name not in PROTECTED:
        # A real package under a fresh name would load (slowly): keep the name taken.
        name = "victim"
    LOADED_NAMES.add(name)
    code = _call(
        env,
        "native",
        env.stub.LoadModel,
        pb.LoadModelRequest(
            name=name,
            path=p,
            devices=devices,
            runners_per_device=runners,
            package_model=package_model,
        ),
    )
    assert code != grpc.StatusCode.OK or name in PROTECTED
    if (
        p
        in (
            "/etc/passwd",
            "/",
            "/proc/self/mem",
            "/dev/zero",
            str(env.srv.repo / "escape.pt2"),
            str(env.srv.repo / ".." / "mlp.pt2"),
        )
        and runners <= 64
    ):
        assert code == grpc.StatusCode.PERMISSION_DENIED, p


@settings(max_examples=_n(150), **FUZZ)
@given(name=names.filter(lambda n: n not in PROTECTED))
def test_fuzz_unload_model(env, name):
    _call(env, "native", env.stub.UnloadModel, pb.UnloadModelRequest(name=name))


@settings(max_examples=_n(150), **FUZZ)
@given(
    raw=st.binary(max_size=300),
    method=st.sampled_from(
        [
            "Run",
            "GetCallSpec",
            "LoadModel",
            "UnloadModel",
            "UpdateConstantBufferFromBlob",
            "SwapConstantBuffer",
            "ExtractConstantsMap",
            "ListModels",
        ]
    ),
)
def test_fuzz_native_raw_bytes(env, raw, method):
    """Arbitrary bytes as the request message: undecodable ones are refused by gRPC
    itself; decodable ones must get a proper answer too."""
    path = f"/aotiserve.v1.ModelRunner/{method}"
    if method == "UnloadModel":
        try:
            if pb.UnloadModelRequest.FromString(raw).name in PROTECTED:
                return
        except Exception:  # noqa: BLE001
            pass
    if method == "LoadModel":
        return _raw_load(env, raw)
    if method == "ExtractConstantsMap":
        fn = env.srv.channel.unary_stream(path)
    else:
        fn = env.srv.channel.unary_unary(path)
    SENT["native"] += 1
    try:
        r = fn(raw, timeout=TIMEOUT)
        if hasattr(r, "__next__"):
            for _ in r:
                pass
    except grpc.RpcError as exc:
        # Undecodable bytes are INVALID_ARGUMENT from the interceptor (gRPC's own
        # deserializer would say INTERNAL and leak the call).
        assert exc.code() in PROPER, (exc.code(), exc.details())


@st.composite
def mutated_run_bytes(draw):
    """A valid RunRequest's bytes with a few edits: bit flips, byte sets, inserts,
    deletes, truncation, runs of 0xff (over-long varints)."""
    model = draw(st.sampled_from(SERVED))
    ins = model_zoo.MODELS[model].inputs(draw(st.integers(1, 3)), seed=draw(st.integers(0, 3)))
    raw = bytearray(wire.run_request(model, ins).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        if not raw:
            break
        _edit(draw, raw)
    return bytes(raw)


def _edit(draw, raw: bytearray) -> None:
    """One edit of non-empty ``raw`` in place: a bit flip, a byte set, an insert, a delete,
    a truncation or a run of 0xff (an over-long varint)."""
    kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "varint"]))
    i = draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "set":
        raw[i] = draw(st.integers(0, 255))
    elif kind == "insert":
        raw[i:i] = draw(st.binary(min_size=1, max_size=12))
    elif kind == "delete":
        del raw[i : i + draw(st.integers(1, 8))]
    elif kind == "truncate":
        del raw[i:]
    else:
        raw[i:i] = b"\xff" * draw(st.integers(1, 11))


def _raw_run(env, raw: bytes):
    SENT["native"] += 1
    try:
        out = env.raw_run(raw, timeout=TIMEOUT)
        return grpc.StatusCode.OK, pb.RunResponse.FromString(out)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


@settings(max_examples=_n(250), **FUZZ)
@given(raw=mutated_run_bytes())
def test_fuzz_run_wire_bytes_against_protobuf(env, raw):
    """Differential: the server's Run decoding must accept exactly what protobuf accepts,
    and answer a mutated request as it answers protobuf's reading of it."""
    code, got = _raw_run(env, raw)
    assert code in PROPER, (code, got)
    try:
        parsed = pb.RunRequest.FromString(raw)
    except Exception:  # noqa: BLE001 (DecodeError)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, got)
        return
    want_code, want = _raw_run(env, parsed.SerializeToString())
    assert code == want_code, (code, got, want_code, want)
    if code == grpc.StatusCode.OK:
        assert [(t.dtype, list(t.shape), t.data) for t in got.outputs] == [
            (t.dtype, list(t.shape), t.data) for t in want.outputs
        ]


@st.composite
def mutated_upload_stream(draw, env):
    """A valid victim upload (header + chunks) as bytes, one or two messages edited."""
    weights = {k: v.clone() for k, v in env.constants.items()}
    msgs = [
        m.SerializeToString()
        for m in wire.upload_requests(
            "victim",
            weights,
            validate_full=draw(st.booleans()),
            chunk_bytes=draw(st.sampled_from([512, 4096, 1 << 20])),
        )
    ]
    for _ in range(draw(st.integers(1, 2))):
        j = draw(st.integers(0, len(msgs) - 1))
        raw = bytearray(msgs[j])
        if not raw:
            continue
        _edit(draw, raw)
        msgs[j] = bytes(raw)
    return msgs


def _raw_upload(env, msgs):
    SENT["native"] += 1
    try:
        env.raw_upload(iter(msgs), timeout=TIMEOUT)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


@settings(max_examples=_n(120), **FUZZ)
@given(data=st.data())
def test_fuzz_upload_wire_bytes_against_protobuf(env, data):
    """Differential, as for Run: a mutated upload stream gets the answer protobuf's
    reading of it gets (undecodable: INVALID_ARGUMENT)."""
    msgs = data.draw(mutated_upload_stream(env))
    code, details = _raw_upload(env, msgs)
    assert code in PROPER, (code, details)
    # protobuf's reading: the messages it decodes, re-encoded, up to the first it refuses,
    # which becomes bytes nobody decodes (the stream is read in order: an error in the
    # prefix comes first).
    canonical = []
    for m in msgs:
        try:
            canonical.append(pb.UpdateConstantBufferRequest.FromString(m).SerializeToString())
        except Exception:  # noqa: BLE001 (DecodeError)
            canonical.append(b"\xff\xff\xff")
            break
    want_code, want = _raw_upload(env, canonical)
    assert code == want_code, (code, details, want_code, want)
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        assert details == want, (details, want)


def _raw_load(env, raw):
    try:
        req = pb.LoadModelRequest.FromString(raw)
    except Exception:  # noqa: BLE001
        return
    if req.name in PROTECTED or req.name == "":
        return
    req.path = "/etc/passwd"
    LOADED_NAMES.add(req.name)
    _call(env, "native", env.stub.LoadModel, req)


# ---------------------------------------------------------------- OIP service

datatypes = st.one_of(
    st.sampled_from(
        [
            "FP32",
            "FP64",
            "FP16",
            "BF16",
            "INT8",
            "INT16",
            "INT32",
            "INT64",
            "UINT8",
            "UINT16",
            "UINT32",
            "UINT64",
            "BOOL",
            "BYTES",
            "",
            "fp32",
            "FP8",
        ]
    ),
    odd_text,
)
oip_params = st.dictionaries(
    st.sampled_from(
        [
            "sequence_id",
            "sequence_start",
            "sequence_end",
            "priority",
            "timeout",
            "shared_memory_region",
            "shared_memory_byte_size",
            "shared_memory_offset",
            "classification",
            "binary_data",
            "x",
        ]
    ),
    st.one_of(
        st.builds(ipb.InferParameter, bool_param=st.booleans()),
        st.builds(ipb.InferParameter, int64_param=st.integers(-(1 << 63), (1 << 63) - 1)),
        st.builds(ipb.InferParameter, string_param=odd_text),
        st.builds(ipb.InferParameter),
    ),
    max_size=2,
)


@st.composite
def infer_contents(draw, numel_hint):
    n = draw(st.one_of(st.just(max(0, min(numel_hint, 300))), st.integers(0, 40)))
    which = draw(
        st.sampled_from(
            [
                "bool_contents",
                "int_contents",
                "int64_contents",
                "uint_contents",
                "uint64_contents",
                "fp32_contents",
                "fp64_contents",
                "bytes_contents",
            ]
        )
    )
    c = ipb.InferTensorContents()
    vals = {
        "bool_contents": st.booleans(),
        "int_contents": st.integers(-(1 << 31), (1 << 31) - 1),
        "int64_contents": st.integers(-(1 << 63), (1 << 63) - 1),
        "uint_contents": st.integers(0, (1 << 32) - 1),
        "uint64_contents": st.integers(0, (1 << 64) - 1),
        "fp32_contents": st.floats(width=32, allow_nan=True),
        "fp64_contents": st.floats(allow_nan=True),
        "bytes_contents": st.binary(max_size=8),
    }[which]
    getattr(c, which).extend(
        draw(st.lists(vals, min_size=min(n, 40), max_size=min(n, 40)))
        if n <= 40
        else [draw(vals)] * n
    )
    return c


@st.composite
def infer_request(draw):
    model = draw(st.one_of(st.sampled_from(["mlp", "two_io", "victim"]), names))
    spec_inputs = {
        "mlp": [("x", "FP32", 2)],
        "two_io": [("x", "FP32", 2), ("ids", "INT64", 1)],
        "victim": [("x", "FP32", 2)],
    }.get(model, [("x", "FP32", 2)])
    req = ipb.ModelInferRequest(model_name=model, id=draw(odd_text))
    if draw(st.floats(0, 1)) < 0.2:
        req.model_version = draw(st.one_of(st.just("initial"), odd_text))
    for k, v in draw(oip_params).items():
        req.parameters[k].CopyFrom(v)
    plausible = draw(st.floats(0, 1)) < 0.6
    raw_mode = draw(st.booleans())
    if plausible:
        batch = draw(st.one_of(st.integers(0, 6), st.sampled_from([256, 1025])))
        ins = [
            (n, dt_, [batch, 64 if (n == "x" and model != "two_io") else 16][:rank])
            for n, dt_, rank in spec_inputs
        ]
        if draw(st.floats(0, 1)) < 0.3:
            ins = draw(st.permutations(ins))
        if draw(st.floats(0, 1)) < 0.15 and ins:
            ins = ins[:-1]
    else:
        ins = draw(
            st.lists(
                st.tuples(
                    st.one_of(st.sampled_from(["x", "ids", "y"]), odd_text), datatypes, shape
                ),
                max_size=3,
            )
        )
    for name, dt_, shp in ins:
        if draw(st.floats(0, 1)) < 0.1:
            dt_ = draw(datatypes)
        t = req.inputs.add(name=name, datatype=dt_, shape=shp)
        for k, v in draw(oip_params).items():
            t.parameters[k].CopyFrom(v)
        numel = 1
        for x in shp:
            numel *= x
        if raw_mode:
            item = {"FP32": 4, "INT64": 8, "FP64": 8, "FP16": 2, "BF16": 2, "INT32": 4}.get(dt_, 1)
            nbytes = numel * item
            if plausible and 0 <= nbytes <= 1 << 18 and draw(st.floats(0, 1)) < 0.8:
                if dt_ == "INT64" and draw(st.booleans()):
                    data = torch.randint(0, 100, (max(numel, 0),)).numpy().tobytes()
                else:
                    data = os.urandom(nbytes)
            else:
                data = draw(st.binary(max_size=300))
            req.raw_input_contents.append(data)
        else:
            t.contents.CopyFrom(draw(infer_contents(numel if numel >= 0 else 0)))
    if draw(st.floats(0, 1)) < 0.1:
        req.raw_input_contents.append(draw(st.binary(max_size=16)))
    for _ in range(draw(st.integers(0, 2))):
        out = req.outputs.add(
            name=draw(st.one_of(st.sampled_from(["h", "ids2", "output__0"]), odd_text))
        )
        for k, v in draw(oip_params).items():
            out.parameters[k].CopyFrom(v)
    return req


@settings(max_examples=_n(900), **FUZZ)
@given(req=infer_request())
def test_fuzz_oip_model_infer(env, req):
    _call(env, "oip", env.oip.ModelInfer, req)


@settings(max_examples=_n(150), **FUZZ)
@given(reqs=st.lists(infer_request(), min_size=0, max_size=5))
def test_fuzz_oip_stream_infer(env, reqs):
    SENT["oip"] += max(0, len(reqs) - 1)
    responses = []

    def collect(*a, **k):
        responses.extend(env.oip.ModelStreamInfer(*a, **k))

    _call(env, "oip", collect, iter(reqs))
    assert len(responses) == len(reqs)  # one answer per request, errors in-band


def _oip_unary_requests():
    out = []
    for m in ipb.service.methods:
        if m.client_streaming or m.server_streaming or m.name in ("ModelInfer",):
            continue
        out.append((m.name, getattr(ipb, m.input_type.name)))
    return out


OIP_UNARY = _oip_unary_requests()


@st.composite
def oip_unary(draw):
    method, cls = draw(st.sampled_from(OIP_UNARY))
    req = cls()
    fields = {f.name: f for f in cls.DESCRIPTOR.fields}
    for fname, f in fields.items():
        if f.type == f.TYPE_STRING and not f.is_repeated:
            if fname in ("name", "model_name"):
                value = draw(names)
            elif fname == "version":
                value = draw(st.one_of(st.just(""), st.just("initial"), odd_text))
            else:
                value = draw(odd_text)
            setattr(req, fname, value)
        elif f.type == f.TYPE_BOOL and not f.is_repeated:
            setattr(req, fname, draw(st.booleans()))
        elif f.type in (f.TYPE_UINT64, f.TYPE_UINT32) and not f.is_repeated:
            setattr(req, fname, draw(st.integers(0, (1 << 32) - 1)))
        elif f.type in (f.TYPE_INT64, f.TYPE_INT32) and not f.is_repeated:
            setattr(req, fname, draw(st.integers(-(1 << 31), (1 << 31) - 1)))
    if method == "RepositoryModelLoad":
        for k, v in draw(
            st.dictionaries(
                st.sampled_from(["config", "file:1/model.pt2", "x"]),
                st.builds(ipb.ModelRepositoryParameter, string_param=odd_text),
                max_size=2,
            )
        ).items():
            req.parameters[k].CopyFrom(v)
        if draw(st.booleans()):
            req.model_name = draw(
                st.sampled_from(
                    [
                        "junk",
                        "escape",
                        "../mlp",
                        "sub/../mlp",
                        "/etc/passwd",
                        "sub",
                        "..",
                        "mlp",
                        "nope",
                        "mlp.pt2",
                    ]
                )
            )
    if method == "RepositoryModelUnload" and getattr(req, "model_name", "") in PROTECTED:
        req.model_name = "nope"
    return method, req


@settings(max_examples=_n(1000), **FUZZ)
@given(item=oip_unary())
def test_fuzz_oip_unary(env, item):
    method, req = item
    if method == "RepositoryModelLoad":
        LOADED_NAMES.add(req.model_name)
    code = _call(env, "oip", getattr(env.oip, method), req)
    if method == "RepositoryModelLoad" and req.model_name == "escape" and not req.parameters:
        # The repository is the operator's: its symlinks are followed (as at start-up);
        # /etc/passwd is no package.
        assert code == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- afterwards


def test_after_fuzzing_results_are_unchanged_and_nothing_leaks(env):
    print(f"generated requests sent: {dict(SENT)}")
    assert SENT["native"] >= 2000 * min(SCALE, 1), SENT
    assert SENT["oip"] >= 2000 * min(SCALE, 1), SENT
    for m in SERVED:
        after = _run_outputs(env, m)
        assert all(torch.equal(a, b) for a, b in zip(after, env.golden[m])), m
    listed = {i.name: i for i in env.stub.ListModels(pb.ListModelsRequest()).models}
    for m in SERVED:
        assert listed[m].active_version.id == "initial"
        assert not listed[m].HasField("staged_version")
    metrics = env.srv.app.metrics
    staging = {k: g._value.get() for k, g in metrics.staging_bytes._metrics.items()}
    assert all(v == 0 for v in staging.values()), staging
    # Request metrics are labelled by model: a fuzzed name adds a series only where an
    # (admin) load registered it, never from a plain request.
    known = {m.name for m in env.srv.app.registry.models()} | LOADED_NAMES | {"", "<unknown>"}
    models = {
        sample.labels["model"]
        for family in metrics.registry.collect()
        if family.name == "aotiserve_requests"
        for sample in family.samples
    }
    assert models <= known, sorted(models - known)[:20]
