"""Faults (issue 8): cancels, disconnects, expired deadlines, models that raise, SIGKILL.

Covered elsewhere, not repeated here: a cancel mid-upload
(test_server_weights.py::test_cancel_mid_upload_frees_staging_and_changes_nothing),
SIGKILL mid-upload then restart (test_server_durability.py), SIGTERM under load with
no accepted call lost (test_server_shutdown.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import grpc
import model_zoo
import pytest
import torch
import wire
from helpers import eager_with, new_weights, wait_for
from server_harness import daemon_process, start_daemon

from aotiserve.server.device_pool import DevicePool
from aotiserve.server.errors import DeadlineExceeded
from aotiserve.v1 import model_runner_pb2 as pb
from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc

CODE = grpc.StatusCode


def _computed(s, model="mlp") -> float:
    return s.app.metrics.sample("aotiserve_device_requests_total", model=model, device="cpu")


def _idle(s) -> bool:
    pool = s.app.pools["cpu"]
    return (
        pool.running == 0
        and pool.waiting == 0
        and s.app.port_server.pool_state("cpu") == (0, 0)
        and s.app.port_server.wait_idle(0)
    )


@pytest.fixture
def one_runner(server_factory):
    s = server_factory(["mlp", "two_io"], runners_per_model=1)
    s.slot = s.app.registry.get("mlp").replicas[0].slot
    s.pool = s.app.pools["cpu"]
    return s


# ---------------------------------------------------------------- deadlines and cancels


def test_queued_run_whose_deadline_passes_is_dropped_not_computed(one_runner):
    s = one_runner
    x = model_zoo.MODELS["mlp"].inputs(2)
    s.stub.Run(wire.run_request("mlp", x))
    before = _computed(s)
    with s.app.port_server.holding_a_runner("mlp"):  # the only runner is busy
        with pytest.raises(grpc.RpcError) as e:
            s.stub.Run(wire.run_request("mlp", x), timeout=0.3)
        assert e.value.code() == CODE.DEADLINE_EXCEEDED
        wait_for(
            lambda: s.app.port_server.pool_state("cpu")[1] == 0,
            what="the expired run to leave the queue",
        )
    wait_for(lambda: _idle(s), what="idle")
    assert _computed(s) == before  # dropped from the queue, never run
    assert (
        s.app.metrics.sample(
            "aotiserve_requests_total", model="mlp", method="Run", code="DEADLINE_EXCEEDED"
        )
        >= 1
    )
    assert wire.close(
        wire.outputs(s.stub.Run(wire.run_request("mlp", x))), model_zoo.eager("mlp", x)
    )


def test_run_reaching_a_free_runner_after_its_deadline_is_not_computed():
    pool = DevicePool("cpu", max_queue=4)
    slot = pool.slot(1, "model 'm'")
    with pytest.raises(DeadlineExceeded, match="not computed"):
        with pool.admit(slot, deadline=time.monotonic() - 0.01):
            raise AssertionError("admitted after its deadline")
    assert pool.running == 0 and pool.waiting == 0 and slot.running == 0
    with pool.admit(slot, deadline=time.monotonic() + 10):
        assert pool.running == 1


def test_cancel_mid_run_frees_the_queue_and_the_pool_keeps_serving(one_runner):
    s = one_runner
    x = model_zoo.MODELS["mlp"].inputs(2)
    want = model_zoo.eager("mlp", x)
    s.stub.Run(wire.run_request("mlp", x))
    before = _computed(s)
    with s.app.port_server.holding_a_runner("mlp"):
        futures = [s.stub.Run.future(wire.run_request("mlp", x)) for _ in range(4)]
        wait_for(lambda: s.app.port_server.pool_state("cpu")[1] == 4, what="4 queued runs")
        for f in futures[:3]:
            f.cancel()
        # Cancelled calls leave the queue at once, while the runner is still busy.
        wait_for(
            lambda: s.app.port_server.pool_state("cpu")[1] == 1,
            what="cancelled runs to leave the queue",
        )
    assert all(f.cancelled() for f in futures[:3])
    assert wire.close(wire.outputs(futures[3].result(timeout=30)), want)
    wait_for(lambda: _idle(s), what="idle after cancels")
    assert _computed(s) == before + 1  # only the call still waiting for its answer ran
    # Cancels during compute too: many short-lived calls, then normal service.
    big = wire.run_request("mlp", [torch.randn(1024, 64)])
    for _ in range(20):
        f = s.stub.Run.future(big)
        time.sleep(0.001)
        f.cancel()
    wait_for(lambda: _idle(s), what="idle after cancels during compute")
    assert wire.close(wire.outputs(s.stub.Run(wire.run_request("mlp", x))), want)


def test_upload_cut_by_its_deadline_changes_nothing(server_factory):
    s = server_factory(["mlp"])
    x = model_zoo.MODELS["mlp"].inputs(2)
    gauge = s.app.metrics.staging_bytes.labels("mlp")

    def slow():
        for i, m in enumerate(
            wire.upload_requests("mlp", new_weights("mlp"), validate_full=True, chunk_bytes=256)
        ):
            if i == 5:
                time.sleep(1.0)  # the deadline passes here
            yield m

    with pytest.raises(grpc.RpcError) as e:
        s.stub.UpdateConstantBuffer(slow(), timeout=0.5)
    assert e.value.code() == CODE.DEADLINE_EXCEEDED
    wait_for(lambda: gauge._value.get() == 0 and _idle(s), what="staging freed")
    m = s.stub.ListModels(pb.ListModelsRequest()).models[0]
    assert m.active_version.id == "initial" and not m.HasField("staged_version")
    assert wire.close(
        wire.outputs(s.stub.Run(wire.run_request("mlp", x))), model_zoo.eager("mlp", x)
    )


def test_client_disconnect_during_extract_stream(server_factory):
    s = server_factory(["mlp"])
    for how in ("cancel", "close channel"):
        channel = grpc.insecure_channel(s.target)
        stream = pb_grpc.ModelRunnerStub(channel).ExtractConstantsMap(
            pb.ExtractConstantsMapRequest(model="mlp", chunk_bytes=64)
        )
        got = [next(stream) for _ in range(3)]
        assert all(c.data for c in got)
        if how == "cancel":
            stream.cancel()
        channel.close()
        wait_for(
            lambda: (
                s.app.metrics.sample("aotiserve_in_flight_requests", method="ExtractConstantsMap")
                == 0
                and _idle(s)
            ),
            what=f"stream ended ({how})",
        )
    # Nothing is left holding the model's weight lock: a full weight cycle works.
    weights = new_weights("mlp")
    s.stub.UpdateConstantBuffer(wire.upload_requests("mlp", weights, validate_full=True))
    s.stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
    x = model_zoo.MODELS["mlp"].inputs(2)
    assert wire.close(
        wire.outputs(s.stub.Run(wire.run_request("mlp", x))), eager_with("mlp", weights, x)
    )
    assert len(wire.extract(s.stub, "mlp", chunk_bytes=64)) == 5


# ---------------------------------------------------------------- models that raise


def test_model_raising_inside_run_is_invalid_argument_and_the_pool_keeps_working(one_runner):
    s = one_runner
    guard = wire.run_request("two_io", model_zoo.MODELS["two_io"].inputs(1025))  # batch <= 1024
    ids_out = list(model_zoo.MODELS["two_io"].inputs(3))
    ids_out[1] = torch.tensor([1, 500, 2])  # embedding of 100 rows: index out of bounds
    out_of_bounds = wire.run_request("two_io", ids_out)
    good_x = model_zoo.MODELS["two_io"].inputs(3)
    good, want = wire.run_request("two_io", good_x), model_zoo.eager("two_io", good_x)
    results = []

    def client(i):
        for j in range(10):
            req = (guard, out_of_bounds, good)[(i + j) % 3]
            try:
                out = wire.outputs(s.stub.Run(req, timeout=30))
                results.append("ok" if wire.close(out, want) else "wrong")
            except grpc.RpcError as e:
                results.append((e.code(), "bounds" if req is out_of_bounds else "guard"))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert "wrong" not in results
    errors = {r for r in results if r != "ok"}
    assert errors == {(CODE.INVALID_ARGUMENT, "bounds"), (CODE.INVALID_ARGUMENT, "guard")}
    assert results.count("ok") == sum(1 for i in range(4) for j in range(10) if (i + j) % 3 == 2)
    wait_for(lambda: _idle(s), what="idle")
    assert wire.close(wire.outputs(s.stub.Run(good)), want)


# ---------------------------------------------------------------- SIGKILL mid-staging and mid-swap


def _daemon_stub(d):
    channel = grpc.insecure_channel(d.target)
    return channel, pb_grpc.ModelRunnerStub(channel)


def _check_serves(stub, version_id: str, weights, x):
    m = stub.ListModels(pb.ListModelsRequest()).models[0]
    assert m.active_version.id == version_id
    resp, call = stub.Run.with_call(wire.run_request("mlp", x))
    want = eager_with("mlp", weights, x) if weights is not None else model_zoo.eager("mlp", x)
    assert wire.close(wire.outputs(resp), want)


@pytest.mark.slow
def test_sigkill_during_staging_and_during_swap_then_restart(tmp_path):
    """Each restart serves the last committed version: a version whose swap answered OK,
    never one that was only staging, and never a half-written file."""
    weights_dir = tmp_path / "weights"
    args = ["--weights-dir", str(weights_dir)]
    x = model_zoo.MODELS["mlp"].inputs(3)
    w1, w2, w3 = (new_weights("mlp", f) for f in (0.5, 1.5, 2.5))

    with daemon_process(["mlp"], args) as d:
        repo = d.repo
        channel, stub = _daemon_stub(d)
        v1 = stub.UpdateConstantBuffer(wire.upload_requests("mlp", w1, validate_full=True)).version
        stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="mlp"))
        # Kill while a complete upload is being staged (written to the runner and the store).
        done = stub.UpdateConstantBuffer.future(
            wire.upload_requests("mlp", w2, validate_full=True, chunk_bytes=512)
        )
        time.sleep(0.02)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        staged_ok = done.exception(30) is None
        channel.close()
    with daemon_process(["mlp"], args, repo=repo) as d:
        channel, stub = _daemon_stub(d)
        _check_serves(stub, v1.id, w1, x)  # staged or not, only a swap commits
        assert not stub.ListModels(pb.ListModelsRequest()).models[0].HasField("staged_version")
        # Kill during a swap: fire it and kill without waiting for the answer.
        v3 = stub.UpdateConstantBuffer(wire.upload_requests("mlp", w3, validate_full=True)).version
        swap = stub.SwapConstantBuffer.future(pb.SwapConstantBufferRequest(model="mlp"))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        swapped = swap.exception(30) is None
        channel.close()
    with daemon_process(["mlp"], args, repo=repo) as d:
        channel, stub = _daemon_stub(d)
        served = stub.ListModels(pb.ListModelsRequest()).models[0].active_version.id
        if swapped:  # the client was told the swap happened: it must have been committed
            assert served == v3.id
        assert served in (v1.id, v3.id)
        _check_serves(stub, served, w1 if served == v1.id else w3, x)
        channel.close()
    current = json.loads((weights_dir / "mlp" / "current.json").read_text())
    assert current["id"] == served
    assert not list(weights_dir.rglob("*.tmp"))
    print(f"staging finished before the kill: {staged_ok}; swap answered: {swapped}")


def test_inputs_refused_by_a_shape_guard_are_freed(model_package):
    """torch's runner leaked its input handles when the model's shape guard refused them
    (each refused request pinned its input tensors and request bytes: a soak with 5%
    such requests grew the daemon by 20 MiB a minute); runner_ext frees them."""
    import gc
    import weakref

    from aotiserve import runner_ext

    loaded = runner_ext.load_model(str(model_package("two_io")), num_runners=1)
    try:
        refs = []
        for _ in range(5):
            x, ids = torch.randn(1025, 16), torch.randint(0, 100, (1025,))  # batch <= 1024
            refs += [weakref.ref(x), weakref.ref(ids)]
            with pytest.raises((RuntimeError, ValueError), match="1024"):
                loaded.runner.run([x, ids])
            del x, ids
        gc.collect()
        assert [r() is None for r in refs] == [True] * len(refs)
        ok = model_zoo.MODELS["two_io"].inputs(2)
        assert wire.close(loaded.runner.run(list(ok)), model_zoo.eager("two_io", ok))
    finally:
        loaded.close()


@pytest.mark.slow
def test_concurrent_weight_ops_loads_and_unloads_never_crash(tmp_path):
    """Threads race stage/swap/rollback/free/extract/run/unload/load on one model (in a
    daemon process, so a crash in the runner shows as a dead daemon, not a dead test);
    every answer is a proper code, the daemon lives, the other model is untouched."""
    import random

    (tmp_path / "junk.blob").write_bytes(b"\0" * 64)
    (tmp_path / "models").mkdir()
    d = start_daemon(
        ["mlp"],
        [
            "--weights-dir",
            str(tmp_path / "weights"),
            "--allowed-root",
            str(tmp_path),
            "--model-root",
            str(tmp_path / "models"),
        ],
    )
    d_repo = d.repo
    pkg = tmp_path / "models" / "victim.pt2"
    shutil.copy(model_zoo.compiled("mlp"), pkg)  # below the model root (a link would leave it)
    channel, stub = _daemon_stub(d)
    load = pb.LoadModelRequest(name="victim", path=str(pkg))
    stub.LoadModel(load)
    x = model_zoo.MODELS["mlp"].inputs(2)
    weights = new_weights("mlp", 1.7)
    allowed = {
        CODE.OK,
        CODE.FAILED_PRECONDITION,
        CODE.NOT_FOUND,
        CODE.UNAVAILABLE,
        CODE.ALREADY_EXISTS,
        CODE.INVALID_ARGUMENT,
        CODE.ABORTED,
    }  # an extract whose weights flipped under it
    ops = {
        "stage": lambda: stub.UpdateConstantBuffer(
            wire.upload_requests("victim", weights, validate_full=True, chunk_bytes=2048),
            timeout=60,
        ),
        "swap": lambda: stub.SwapConstantBuffer(
            pb.SwapConstantBufferRequest(model="victim"), timeout=60
        ),
        "rollback": lambda: stub.RollbackConstantBuffer(
            pb.RollbackConstantBufferRequest(model="victim"), timeout=60
        ),
        "free": lambda: stub.FreeInactiveConstantBuffer(
            pb.FreeInactiveConstantBufferRequest(model="victim"), timeout=60
        ),
        "extract": lambda: list(
            stub.ExtractConstantsMap(
                pb.ExtractConstantsMapRequest(model="victim", use_inactive=random.random() < 0.5),
                timeout=60,
            )
        ),
        "run": lambda: stub.Run(wire.run_request("victim", x), timeout=60),
        "blob": lambda: stub.UpdateConstantBufferFromBlob(
            pb.UpdateConstantBufferFromBlobRequest(
                model="victim", weights_path=str(tmp_path / "junk.blob")
            ),
            timeout=60,
        ),
        "unload": lambda: stub.UnloadModel(pb.UnloadModelRequest(name="victim"), timeout=60),
        "load": lambda: stub.LoadModel(load, timeout=60),
        "describe": lambda: (
            stub.GetCallSpec(pb.GetCallSpecRequest(model="victim"), timeout=60),
            stub.GetConstantNamesToDtypes(
                pb.GetConstantNamesToDtypesRequest(model="victim"), timeout=60
            ),
        ),
    }
    names = list(ops)
    bad: list = []
    seen: dict = {}
    stop = time.monotonic() + float(os.environ.get("FAULT_S", "10"))

    def worker(seed):
        rng = random.Random(seed)
        while time.monotonic() < stop and not bad:
            op = rng.choices(names, weights=[4, 3, 3, 3, 2, 4, 1, 1, 2, 2])[0]
            try:
                ops[op]()
                code = CODE.OK
            except grpc.RpcError as e:
                code = e.code()
                if code not in allowed:
                    bad.append((op, code, e.details()))
            seen[(op, code)] = seen.get((op, code), 0) + 1

    try:
        _race(d, bad, [threading.Thread(target=worker, args=(i,)) for i in range(4)])
        assert seen.get(("swap", CODE.OK)) and seen.get(("unload", CODE.OK)), seen
        assert wire.close(
            wire.outputs(stub.Run(wire.run_request("mlp", x))), model_zoo.eager("mlp", x)
        )
        # The victim, if loaded, serves one of the two weight sets.
        try:
            out = wire.outputs(stub.Run(wire.run_request("victim", x)))
        except grpc.RpcError as e:
            assert e.code() in (CODE.NOT_FOUND, CODE.UNAVAILABLE)
        else:
            assert wire.close(out, model_zoo.eager("mlp", x)) or wire.close(
                out, eager_with("mlp", weights, x)
            )
    finally:
        channel.close()
        d.proc.kill()
        d.proc.wait(30)
    assert d_repo.exists()


def test_extract_stream_survives_unload_and_aborts_on_swap(tmp_path):
    """ExtractConstantsMap streams views of the runner's buffers: an unload mid-stream
    freed them under the reader (SIGSEGV with 16 MiB constants); a swap mid-stream mixed
    old and new weights in one download.

    The server writes a stream's chunks only as fast as HTTP/2 flow control lets it, so
    the client, by not reading, holds it mid-stream: with BDP probing off its receive
    window stays at the 64 KiB default (measured: 3 chunks of 64 KiB in flight however
    long the client waits), far less than the 16 MiB being streamed, so the unload and
    the swap always arrive mid-stream, however loaded the machine (with BDP probing on,
    the window grew to ~5 MiB and a small model's whole stream could be sent first)."""
    pkg = tmp_path / "big.pt2"
    shutil.copy(model_zoo.compiled("compute"), pkg)  # 4 x Linear(1024, 1024): 16 MiB
    d = start_daemon(["mlp"], ["--model-root", str(tmp_path)])
    try:
        channel = grpc.insecure_channel(
            d.target,
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)],
        )
        stub = pb_grpc.ModelRunnerStub(channel)
        for name in ("big", "big2"):
            stub.LoadModel(pb.LoadModelRequest(name=name, path=str(pkg)))
        stream = stub.ExtractConstantsMap(
            pb.ExtractConstantsMapRequest(model="big", chunk_bytes=1 << 16)
        )
        next(stream)
        stub.UnloadModel(pb.UnloadModelRequest(name="big"), timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            for _ in stream:
                pass
        assert e.value.code() == CODE.UNAVAILABLE, e.value.details()
        assert d.proc.poll() is None, d.log()[-2000:]
        # A swap mid-stream aborts the download instead of mixing weight sets.
        old = wire.extract(stub, "big2")
        want = {k: v + 1 for k, v in old.items()}
        stub.UpdateConstantBuffer(wire.upload_requests("big2", want, validate_full=True))
        stream = stub.ExtractConstantsMap(
            pb.ExtractConstantsMapRequest(model="big2", chunk_bytes=1 << 16)
        )
        first = next(stream)
        assert first.data == old[first.name].numpy().tobytes()[: len(first.data)]  # the old set
        stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="big2"))
        with pytest.raises(grpc.RpcError) as e:
            for _ in stream:
                pass
        assert e.value.code() == CODE.ABORTED and "retry" in e.value.details()
        got = wire.extract(stub, "big2")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        channel.close()
    finally:
        d.proc.kill()
        d.proc.wait(30)


def test_client_cancels_an_oip_infer_stream(server_factory):
    from oip_messages import OipStub, ipb

    s = server_factory(["mlp"])
    oip = OipStub(s.channel)
    x = model_zoo.MODELS["mlp"].inputs(2)[0]
    req = ipb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.numpy().tobytes()])
    req.inputs.add(name="x", datatype="FP32", shape=[2, 64])
    more = threading.Event()

    def requests():
        yield req
        more.wait(30)  # the client stalls, then goes away
        yield req

    stream = oip.ModelStreamInfer(requests())
    first = next(stream)
    assert not first.error_message and first.infer_response.outputs
    stream.cancel()
    more.set()
    wait_for(lambda: _idle(s), what="stream handler finished")
    assert oip.ModelInfer(req).outputs


def _race(d, bad: list, threads: list[threading.Thread]) -> None:
    """Runs ``threads`` to their end against daemon ``d``: it must live, and nothing may have
    been added to ``bad``."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert d.proc.poll() is None, d.log()[-3000:]
    assert not bad, (bad[:5], _from_first_error(d.log()))


def _from_first_error(log: str) -> str:
    """The daemon's log from its first ERROR line on (its traceback names the cause)."""
    at = log.find(" ERROR ")
    return log[max(0, log.rfind("\n", 0, at)) : at + 6000] if at >= 0 else log[-6000:]


@pytest.mark.slow
def test_batched_runs_racing_unloads_loads_and_swaps_never_crash(tmp_path):
    """Dynamic batching on the port: 6 clients send one- and two-row Runs while another
    thread unloads, reloads and swaps the model (in a daemon process); every answer is
    either exactly the caller's rows under one of the two weight sets, or UNAVAILABLE /
    NOT_FOUND, and the daemon lives."""
    (tmp_path / "models").mkdir()
    pkg = tmp_path / "models" / "batched.pt2"
    shutil.copy(model_zoo.compiled("mlp"), pkg)
    d = start_daemon(
        ["mlp"],
        [
            "--model-root",
            str(tmp_path / "models"),
            "--batch-max-size",
            "8",
            "--batch-max-delay-us",
            "2000",
            "--runners-per-model",
            "1",
        ],
    )
    channel, stub = _daemon_stub(d)
    load = pb.LoadModelRequest(name="batched", path=str(pkg))
    stub.LoadModel(load)
    weights = new_weights("mlp", 1.5)
    # Inputs and answers made up front: the zoo seeds torch's global generator.
    cases = [model_zoo.MODELS["mlp"].inputs(1 + i % 2, seed=i) for i in range(16)]
    wants = [(model_zoo.eager("mlp", x), eager_with("mlp", weights, x)) for x in cases]
    stop = time.monotonic() + float(os.environ.get("FAULT_S", "8"))
    bad: list = []
    answered = [0]

    def client(seed: int) -> None:
        i = seed
        while time.monotonic() < stop and not bad:
            i = (i + 1) % len(cases)
            try:
                out = wire.outputs(stub.Run(wire.run_request("batched", cases[i]), timeout=60))
            except grpc.RpcError as e:
                if e.code() not in (CODE.UNAVAILABLE, CODE.NOT_FOUND):
                    bad.append((e.code(), e.details()))
                continue
            if not (wire.close(out, wants[i][0]) or wire.close(out, wants[i][1])):
                bad.append(("wrong rows", seed, i))
            answered[0] += 1

    def admin() -> None:
        while time.monotonic() < stop and not bad:
            try:
                stub.UpdateConstantBuffer(
                    wire.upload_requests("batched", weights, validate_full=True), timeout=60
                )
                stub.SwapConstantBuffer(pb.SwapConstantBufferRequest(model="batched"), timeout=60)
                stub.UnloadModel(pb.UnloadModelRequest(name="batched"), timeout=60)
                stub.LoadModel(load, timeout=60)
            except grpc.RpcError as e:
                if e.code() not in (CODE.UNAVAILABLE, CODE.NOT_FOUND, CODE.FAILED_PRECONDITION):
                    bad.append((e.code(), e.details()))

    try:
        clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        _race(d, bad, [*clients, threading.Thread(target=admin)])
        assert answered[0] > 0
    finally:
        channel.close()
        d.proc.kill()
