"""The real client against a real daemon on port 0: every handle method gives
what the runner extension gives, on every test model; errors arrive as typed
exceptions with their status codes; the numpy-only path and the docs snippet work."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import TEST_MODELS
from helpers import wait_for
from server_harness import daemon_process, running_server

import aotiserve.client as ac
from aotiserve import runner_ext

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def srv():
    with running_server(TEST_MODELS) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with ac.Client(srv.target, timeout=60) as c:
        c.wait_until_ready(30)
        yield c


@pytest.fixture(scope="module")
def direct(zoo):
    """The extension's own runner per model: the reference for every mirror method."""
    loaded = {name: runner_ext.load_model(zoo.compiled(name)) for name in TEST_MODELS}
    yield {name: m.runner for name, m in loaded.items()}
    for m in loaded.values():
        m.close()


def _assert_close(got, want):
    assert isinstance(got, torch.Tensor)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _eager_with(zoo, name, inputs, weights=None):
    module = zoo.MODELS[name].module()
    if weights is not None:
        module.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()}, strict=False)
    with torch.no_grad():
        out = module(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("name", TEST_MODELS)
def test_run_equals_eager_and_runner(client, direct, zoo, name):
    model = client.model(name)
    for batch in (1, 5):
        inputs = zoo.MODELS[name].inputs(batch, seed=batch)
        want_eager = zoo.eager(name, inputs)
        want_runner = direct[name].run(list(inputs))
        for sent in (list(inputs), tuple(t.numpy() for t in inputs)):  # torch in, numpy in
            got = model.run(sent)
            assert len(got) == len(want_eager)
            for g, e, r in zip(got, want_eager, want_runner):
                _assert_close(g, e)
                _assert_close(g, r)
        assert model.last_weights_version == "initial"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_describe_methods_mirror_runner(client, direct, name):
    model = client.model(name)
    assert model.get_call_spec() == list(direct[name].get_call_spec())
    assert model.get_constant_names_to_original_fqns() == dict(
        direct[name].get_constant_names_to_original_fqns()
    )
    assert model.get_constant_names_to_dtypes() == dict(direct[name].get_constant_names_to_dtypes())


@pytest.mark.parametrize("name", TEST_MODELS)
@pytest.mark.parametrize("chunk_bytes", [0, 100])
def test_extract_constants_map_equals_runner(client, direct, name, chunk_bytes):
    got = client.model(name).extract_constants_map(False, chunk_bytes=chunk_bytes)
    want = direct[name].extract_constants_map(False)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _scaled(weights):
    return {k: (v * 0.5 + 0.01 if v.is_floating_point() else v.clone()) for k, v in weights.items()}


@pytest.mark.parametrize("name", TEST_MODELS)
def test_stage_swap_rollback_free_like_the_runner(direct, zoo, name):
    # A server of its own: staging again after a free crashes today's daemon
    # (see test_stage_after_free_keeps_the_daemon_alive).
    with running_server([name]) as s, ac.Client(s.target) as client:
        _lifecycle(client.model(name), direct, zoo, name)


def _lifecycle(model, direct, zoo, name):
    inputs = zoo.MODELS[name].inputs(3)
    original = model.extract_constants_map(False)
    new = _scaled(original)

    # the same update on the extension's runner, for reference
    runner = direct[name]
    fqn_to_name = {fqn: n for n, fqn in runner.get_constant_names_to_original_fqns().items()}
    runner.update_constant_buffer({fqn_to_name[k]: v for k, v in new.items()}, True, True)
    runner.swap_constant_buffer()
    want_new = runner.run(list(inputs))
    runner.swap_constant_buffer()  # back to the original weights

    staged = model.update_constant_buffer(new, True, True, chunk_bytes=64, description="scaled")
    assert staged.description == "scaled" and staged.id != "initial"
    info = model.info()
    assert info.staged_version == staged and info.active_version.id == "initial"
    inactive = model.extract_constants_map(True)
    assert all(torch.equal(inactive[k], new[k]) for k in new)
    for g, e in zip(model.run(list(inputs)), zoo.eager(name, inputs)):  # still the old weights
        _assert_close(g, e)

    assert model.swap_constant_buffer() == staged
    got = model.run(list(inputs))
    assert model.last_weights_version == staged.id
    for g, r, e in zip(got, want_new, _eager_with(zoo, name, inputs, new)):
        _assert_close(g, r)
        _assert_close(g, e)

    assert model.rollback_constant_buffer().id == "initial"
    for g, e in zip(model.run(list(inputs)), zoo.eager(name, inputs)):
        _assert_close(g, e)
    assert model.info().previous_version == staged

    with pytest.raises(ac.FailedPreconditionError, match="nothing is staged"):
        model.swap_constant_buffer()
    model.free_inactive_constant_buffer()
    with pytest.raises(ac.FailedPreconditionError, match="no previous weights"):
        model.rollback_constant_buffer()
    assert model.info().active_version.id == "initial"


def test_update_accepts_constant_names_and_partial_updates(zoo):
    with running_server(["mlp"]) as s, ac.Client(s.target) as client:
        _partial_update_by_constant_name(client.model("mlp"), zoo)


def _partial_update_by_constant_name(model, zoo):
    names = model.get_constant_names_to_original_fqns()  # fc1_weight -> fc1.weight
    by_fqn = {fqn: name for name, fqn in names.items()}
    original = model.extract_constants_map(False)
    new_bias = original["fc2.bias"] + 1.0
    model.update_constant_buffer({by_fqn["fc2.bias"]: new_bias}, True, False)
    model.swap_constant_buffer()
    try:
        x = zoo.MODELS["mlp"].inputs(2)
        want = _eager_with(zoo, "mlp", x, {**original, "fc2.bias": new_bias})
        _assert_close(model.run(list(x))[0], want[0])
    finally:
        model.rollback_constant_buffer()
        model.free_inactive_constant_buffer()


def test_update_constant_buffer_from_blob(srv, client, zoo):
    model = client.model("blob_mlp")
    with zipfile.ZipFile(zoo.compiled("blob_mlp")) as zf:
        member = next(n for n in zf.namelist() if n.endswith("_weights.blob"))
        blob = srv.repo / "blob_mlp_weights.blob"
        blob.write_bytes(zf.read(member))
    x = zoo.MODELS["blob_mlp"].inputs(2)
    original = model.extract_constants_map(False)
    model.update_constant_buffer(_scaled(original), True, True)
    model.swap_constant_buffer()
    assert not torch.allclose(model.run(list(x))[0], zoo.eager("blob_mlp", x)[0])
    version = model.update_constant_buffer_from_blob(
        blob
    )  # packaged weights, into the active buffer
    assert version.description.startswith("blob")
    _assert_close(model.run(list(x))[0], zoo.eager("blob_mlp", x)[0])
    assert model.info().active_version == version
    with pytest.raises(ac.PermissionDeniedError):
        model.update_constant_buffer_from_blob("/etc/passwd")
    model.free_inactive_constant_buffer()


# Once a crash (torch's container restaging a freed buffer); runner_ext now guards it.
@pytest.mark.parametrize("name, partial", [("mlp", True), ("blob_mlp", False)])
def test_stage_after_free_keeps_the_daemon_alive(zoo, name, partial):
    with daemon_process([name]) as d, ac.Client(d.target, timeout=60) as client:
        model = client.model(name)
        x = list(zoo.MODELS[name].inputs(3))
        original = model.extract_constants_map(False)
        model.update_constant_buffer(_scaled(original), True, True, chunk_bytes=64)
        model.extract_constants_map(True)
        model.run(x)
        model.swap_constant_buffer()
        model.run(x)
        model.rollback_constant_buffer()
        model.free_inactive_constant_buffer()
        update = {"fc2_bias": original["fc2.bias"] + 1} if partial else _scaled(original)
        with contextlib.suppress(ac.FailedPreconditionError):  # a clear refusal is fine
            model.update_constant_buffer(update, True, not partial)
        _assert_close(model.run(x)[0], zoo.eager(name, x)[0])
        d.proc.poll()
        assert d.proc.returncode is None, d.log()[-3000:]


# ---------------------------------------------------------------- errors


def test_unknown_model_is_not_found_for_every_method(client):
    m = client.model("no-such-model")
    calls = [
        lambda: m.run([np.zeros((1, 64), np.float32)]),
        m.get_call_spec,
        m.get_constant_names_to_original_fqns,
        m.get_constant_names_to_dtypes,
        lambda: m.extract_constants_map(False),
        lambda: m.update_constant_buffer({"w": np.zeros(1, np.float32)}, True, False),
        m.swap_constant_buffer,
        m.rollback_constant_buffer,
        m.free_inactive_constant_buffer,
        m.info,
        lambda: client.unload_model("no-such-model"),
    ]
    for call in calls:
        with pytest.raises(ac.NotFoundError) as e:
            call()
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert "no-such-model" in e.value.details


@pytest.mark.parametrize(
    "inputs, match",
    [
        ([np.zeros((2, 63), np.float32)], r"input 0 \('x'\)"),
        ([np.zeros((2, 64), np.float64)], r"input 0 \('x'\)"),
        ([], r"input"),
        ([np.zeros((2, 64), np.float32)] * 2, r"input"),
    ],
)
def test_bad_inputs_are_invalid_argument_and_server_keeps_serving(client, zoo, inputs, match):
    model = client.model("mlp")
    with pytest.raises(ac.InvalidArgumentError, match=match) as e:
        model.run(inputs)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    x = zoo.MODELS["mlp"].inputs(2)
    _assert_close(model.run(list(x))[0], zoo.eager("mlp", x)[0])


def test_bad_weights_are_invalid_argument_and_change_nothing(client, zoo):
    model = client.model("mlp")
    before = model.info()
    original = model.extract_constants_map(False)
    bad = [
        ({"no.such.weight": torch.zeros(3)}, "no.such.weight"),
        ({"fc1.weight": torch.zeros(3, 3)}, "fc1.weight"),
        ({"fc1.weight": torch.zeros(32, 64, dtype=torch.float64)}, "fc1.weight"),
    ]
    for tensors, name in bad:
        with pytest.raises(ac.InvalidArgumentError, match=re.escape(name)):
            model.update_constant_buffer(tensors, True, False)
    with pytest.raises(ac.InvalidArgumentError):  # incomplete full update
        model.update_constant_buffer({"fc1.weight": original["fc1.weight"]}, True, True)
    after = model.info()
    assert after.active_version == before.active_version and after.staged_version is None
    x = zoo.MODELS["mlp"].inputs(2)
    _assert_close(model.run(list(x))[0], zoo.eager("mlp", x)[0])


def test_admin_token(tmp_path, zoo):
    token_file = tmp_path / "token"
    token_file.write_text("let-me-in\n")
    with running_server(["mlp"], admin_token_file=str(token_file)) as s:
        x = list(zoo.MODELS["mlp"].inputs(1))
        with ac.Client(s.target) as anonymous:
            anonymous.model("mlp").run(x)  # reading needs no token
            with pytest.raises(ac.UnauthenticatedError) as e:
                anonymous.model("mlp").swap_constant_buffer()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with ac.Client(s.target, admin_token="wrong") as wrong:
            with pytest.raises(ac.PermissionDeniedError):
                wrong.model("mlp").free_inactive_constant_buffer()
        with ac.Client(s.target, admin_token="let-me-in") as admin:
            m = admin.model("mlp")
            m.update_constant_buffer(m.extract_constants_map(False), True, True)
            assert m.swap_constant_buffer().id != "initial"


def test_inference_token(tmp_path, zoo):
    (tmp_path / "admin").write_text("admin-secret\n")
    (tmp_path / "infer").write_text("infer-secret\n")
    with running_server(
        ["mlp"],
        admin_token_file=str(tmp_path / "admin"),
        inference_token_file=str(tmp_path / "infer"),
    ) as s:
        x = list(zoo.MODELS["mlp"].inputs(1))
        with ac.Client(s.target) as anonymous:
            assert anonymous.health() == "SERVING"  # probes need no token
            with pytest.raises(ac.UnauthenticatedError):
                anonymous.model("mlp").run(x)
        with ac.Client(s.target, token="wrong") as wrong:
            with pytest.raises(ac.PermissionDeniedError):
                wrong.model("mlp").run(x)
        with ac.Client(s.target, token="infer-secret") as user:
            _assert_close(user.model("mlp").run(x)[0], zoo.eager("mlp", x)[0])
            with pytest.raises(ac.PermissionDeniedError, match="admin token"):  # not an admin
                user.model("mlp").swap_constant_buffer()
        with ac.Client(s.target, admin_token="admin-secret", token="infer-secret") as admin:
            m = admin.model("mlp")
            m.run(x)  # the admin token is taken for inference too
            m.update_constant_buffer(m.extract_constants_map(False), True, True)
            assert m.swap_constant_buffer().id != "initial"


# ---------------------------------------------------------------- client level


def test_model_management_and_health(srv, client, zoo):
    assert client.health() == "SERVING"
    names = [m.name for m in client.list_models()]
    assert sorted(names) == sorted(TEST_MODELS)
    info = client.load_model("mlp_copy", srv.repo / "mlp.pt2", ["cpu"], runners_per_device=1)
    assert info.name == "mlp_copy" and info.devices == ("cpu",) and info.runners_per_device == 1
    x = zoo.MODELS["mlp"].inputs(2)
    _assert_close(client.model("mlp_copy").run(list(x))[0], zoo.eager("mlp", x)[0])
    client.unload_model("mlp_copy")
    with pytest.raises(ac.NotFoundError):
        client.model("mlp_copy").run(list(x))
    with pytest.raises(ac.PermissionDeniedError):
        client.load_model("evil", "/etc/passwd")


def test_async_client_against_the_daemon(srv, zoo, direct):
    async def main():
        async with ac.AsyncClient(srv.target) as client:
            await client.wait_until_ready(30)
            assert await client.health() == "SERVING"
            model = client.model("two_io")
            x = zoo.MODELS["two_io"].inputs(4)
            got = await model.run(list(x))
            for g, e in zip(got, zoo.eager("two_io", x)):
                _assert_close(g, e)
            assert await model.get_call_spec() == list(direct["two_io"].get_call_spec())
            consts = await model.extract_constants_map(False, chunk_bytes=128)
            v = await model.update_constant_buffer(_scaled(consts), True, True)
            assert (await model.swap_constant_buffer()) == v
            assert (await model.rollback_constant_buffer()).id == "initial"
            await model.free_inactive_constant_buffer()
            assert (await model.info()).active_version.id == "initial"
            assert "two_io" in [m.name for m in await client.list_models()]
            with pytest.raises(ac.NotFoundError):
                await client.model("nope").get_call_spec()
            # many calls at once on one channel
            outs = await asyncio.gather(*(model.run(list(x)) for _ in range(16)))
            assert all(torch.equal(o[1], outs[0][1]) for o in outs)

    asyncio.run(main())


NUMPY_ONLY = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # as if torch were not installed
    import numpy as np
    from aotiserve.client import Client
    from aotiserve.client.tensor_codec import torch_available
    assert not torch_available()
    x = np.load(sys.argv[2])
    with Client(sys.argv[1]) as client:
        model = client.model("mlp")
        (y,) = model.run([x])
        assert type(y) is np.ndarray, type(y)
        consts = model.extract_constants_map(False)
        assert all(type(v) is np.ndarray for v in consts.values())
        np.save(sys.argv[3], y)
    assert "torch" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
""")


def test_numpy_only_client_without_torch(srv, zoo, tmp_path):
    x = zoo.MODELS["mlp"].inputs(3)[0].numpy()
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            NUMPY_ONLY,
            srv.target,
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    y = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(
        y, zoo.eager("mlp", [torch.from_numpy(x)])[0].numpy(), rtol=1e-4, atol=1e-5
    )


def _docs_snippet() -> str:
    text = (REPO_ROOT / "docs" / "client.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return blocks[0]


@pytest.mark.slow  # compiles the demo model on a cold cache, as `make serve` does
def test_docs_snippet_runs_as_printed_against_the_demo_model(tmp_path):
    snippet = _docs_snippet()
    code_lines = [line for line in snippet.splitlines() if line.strip()]
    assert len(code_lines) <= 5, snippet
    from aotiserve.server.demo import ensure_demo_package

    package = ensure_demo_package(Path.home() / ".cache" / "aotiserve" / "demo")  # as `make serve`
    (tmp_path / "demo.pt2").symlink_to(package)
    with running_server([], model_repository=str(tmp_path), allowed_roots=(str(tmp_path),)) as s:
        assert "localhost:8500" in snippet
        proc = subprocess.run(
            [sys.executable, "-c", snippet.replace("localhost:8500", s.target)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "the snippet prints its result"


def test_upload_broken_on_the_client_side_raises_its_own_error_and_changes_nothing(zoo):
    from aotiserve.client.dtypes import BY_TORCH_NAME
    from aotiserve.client.tensor_codec import UploadItem, to_wire

    with running_server(["mlp"]) as s, ac.Client(s.target) as client:
        model = client.model("mlp")
        original = model.extract_constants_map(False)

        def broken():
            raise OSError("weights file vanished")

        f32 = BY_TORCH_NAME["float32"]
        items = [
            UploadItem("fc1.weight", f32, (32, 64), lambda: to_wire(original["fc1.weight"] * 0)),
            UploadItem("fc1.bias", f32, (32,), broken),
        ]
        with pytest.raises(OSError, match="vanished"):
            model.stream_constants(items, True, False, chunk_bytes=1024)
        # The client gave up at once; the server learns of the cancel and releases the
        # inactive buffer it claimed a moment later (one upload per model at a time).
        served = s.app.registry.get("mlp")
        wait_for(lambda: not served.weights.uploading, "the cancelled upload's release")

        async def via_async():
            async with ac.AsyncClient(s.target) as aclient:
                await aclient.model("mlp").stream_constants(items, True, False, chunk_bytes=1024)

        with pytest.raises(OSError, match="vanished"):
            asyncio.run(via_async())
        wait_for(lambda: not served.weights.uploading, "the cancelled upload's release")

        info = model.info()
        assert info.active_version.id == "initial" and info.staged_version is None
        x = zoo.MODELS["mlp"].inputs(2)
        _assert_close(model.run(list(x))[0], zoo.eager("mlp", x)[0])
        # and the next upload goes through
        assert model.update_constant_buffer(original, True, True).id != "initial"


def test_weights_larger_than_the_message_limit_travel_both_ways(zoo):
    # compute: four 4 MiB weight matrices; server and client limits of 1 MiB.
    limit = 1 << 20
    with (
        running_server(["compute"], max_message_bytes=limit) as s,
        ac.Client(s.target, max_message_bytes=limit, chunk_bytes=8 << 20) as client,
    ):
        model = client.model("compute")
        weights = model.extract_constants_map(False)  # chunks sized to fit the client's limit
        assert max(w.numel() * w.element_size() for w in weights.values()) == 4 << 20
        new = _scaled(weights)
        model.update_constant_buffer(new, True, True)  # 8 MiB chunks asked: shrunk to fit
        model.swap_constant_buffer()
        x = zoo.MODELS["compute"].inputs(1)
        _assert_close(model.run(list(x))[0], _eager_with(zoo, "compute", x, new)[0])
        assert all(torch.equal(v, new[k]) for k, v in model.extract_constants_map(False).items())
