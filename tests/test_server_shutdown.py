"""SIGTERM under load against a real daemon process (python -m aotiserve.server)."""

from __future__ import annotations

import signal
import threading

import grpc
import model_zoo
import pytest
import wire
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import daemon_process

from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc


@pytest.mark.slow
def test_sigterm_under_load_completes_accepted_calls_then_unavailable():
    with daemon_process(["mlp"], ["--grace-period-s", "20"]) as d:
        channel = grpc.insecure_channel(d.target)
        stub = pb_grpc.ModelRunnerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        inputs = model_zoo.MODELS["mlp"].inputs(64)
        want = model_zoo.eager("mlp", inputs)
        request = wire.run_request("mlp", inputs)
        results: list[list] = [[] for _ in range(4)]
        enough = threading.Barrier(5)
        stop = threading.Event()

        def client(i):
            sent = 0
            while not stop.is_set():
                try:
                    ok = wire.close(wire.outputs(stub.Run(request, timeout=30)), want)
                    results[i].append("ok" if ok else "wrong")
                except grpc.RpcError as e:
                    results[i].append(e.code())
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        break
                sent += 1
                if sent == 20:
                    enough.wait()  # every client is sending: now signal
            if sent < 20:
                enough.abort()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        enough.wait()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0, d.log()
        for t in threads:
            t.join(60)
        channel.close()
        flat = [r for rs in results for r in rs]
        assert "wrong" not in flat
        errors = {r for r in flat if r not in ("ok",)}
        # Accepted calls completed; calls after the signal were refused as UNAVAILABLE.
        assert errors <= {grpc.StatusCode.UNAVAILABLE}, errors
        assert all(rs and rs[-1] == grpc.StatusCode.UNAVAILABLE for rs in results), results
        assert flat.count("ok") >= 80
        assert "draining" in d.log()
