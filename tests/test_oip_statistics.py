"""OIP statistics (``ModelStatistics``) through tritonclient's ``get_inference_statistics``.

A daemon subprocess serves ``mlp`` (its runs on the C++ hot path) and ``mlpb`` (the same
package with dynamic batching on, its runs in Python); the tests send a known sequence
of successes, failures and concurrent (batched) requests and check the counts and
duration sums, and that they equal what /metrics says (one store behind both).

Like test_oip.py this module needs tritonclient in a process that never imported
``aotiserve.oip``; test_oip_isolated.py runs it in a fresh interpreter otherwise.
"""

from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import triton_helpers  # noqa: F401  (first: skips this module where tritonclient cannot load)

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
import model_zoo  # noqa: E402
from server_harness import make_repository, start_daemon  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

BATCH_MAX = 8
ROWS_OK = (1, 3, 2, 5, 4)  # rows of the successful mlp requests


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    repo = make_repository(["mlp"], tmp_path_factory.mktemp("stats-repo"))
    (repo / "mlpb.pt2").symlink_to(model_zoo.compiled("mlp"))
    # One runner, and a long delay: concurrent requests queue and join one batch.
    (repo / "mlpb.toml").write_text(
        f"runners = 1\nbatch_max_size = {BATCH_MAX}\nbatch_max_delay_us = 200000\n"
    )
    d = start_daemon([], ["--metrics-port", "0"], repo=repo)
    yield d
    d.proc.terminate()
    d.proc.wait(30)


@pytest.fixture(scope="module")
def client(daemon):
    c = tritonclient_grpc.InferenceServerClient(daemon.target)
    yield c
    c.close()


def infer(client, model: str, rows: int, cols: int = 64):
    x = np.random.default_rng(rows).standard_normal((rows, cols), dtype=np.float32)
    inp = tritonclient_grpc.InferInput("x", list(x.shape), "FP32")  # the zoo mlp's input
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp])


def stats(client, model: str):
    (s,) = client.get_inference_statistics(model).model_stats
    assert s.name == model
    return s


def metric_samples(daemon) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=30) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (a value may be a
    regular expression)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(k in have and re.fullmatch(v, have[k]) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_server_announces_the_statistics_extension(client):
    assert "statistics" in client.get_server_metadata().extensions


def test_counts_and_durations_match_a_known_sequence(client, daemon):
    assert client.get_model_metadata("mlp").inputs[0].name == "x"
    before = stats(client, "mlp")
    assert before.inference_count == 0 and before.inference_stats.fail.count == 0
    started_ms = int(time.time() * 1000)
    for rows in ROWS_OK:
        infer(client, "mlp", rows)
    for _ in range(2):  # a wrong feature size: refused before it runs
        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT|input"):
            infer(client, "mlp", 2, cols=63)
    s = stats(client, "mlp")
    n_ok = len(ROWS_OK)
    assert s.inference_count == n_ok
    assert s.execution_count == n_ok  # no batching: one run per call
    i = s.inference_stats
    assert i.success.count == n_ok and i.success.ns > 0
    assert i.fail.count == 2 and i.fail.ns > 0
    assert i.queue.count == n_ok and i.compute_infer.count == n_ok
    assert i.compute_infer.ns > 0
    # Decoding and encoding tensors, timed by the hot path for each request it ran.
    assert i.compute_input.count == n_ok and i.compute_input.ns > 0
    assert i.compute_output.count == n_ok and i.compute_output.ns > 0
    assert i.success.ns >= i.compute_input.ns + i.compute_infer.ns + i.compute_output.ns
    # A call's duration holds its wait and its run.
    assert i.success.ns >= i.queue.ns + i.compute_infer.ns
    assert started_ms <= s.last_inference <= int(time.time() * 1000) + 1
    assert s.version == "initial"
    assert list(s.batch_stats) == []  # batching is off for mlp

    # The same store as /metrics.
    text = metric_samples(daemon)
    methods = "Run|ModelInfer"
    assert sample(text, "aotiserve_requests_total", model="mlp", method=methods, code="OK") == n_ok
    assert (
        sample(text, "aotiserve_requests_total", model="mlp", method=methods, code="(?!OK$).*") == 2
    )
    latency_ns = sample(text, "aotiserve_request_seconds_sum", model="mlp", method=methods) * 1e9
    assert latency_ns == pytest.approx(i.success.ns + i.fail.ns, abs=1e3)
    assert sample(text, "aotiserve_device_requests_total", model="mlp") == s.execution_count
    assert sample(text, "aotiserve_queue_seconds_sum", model="mlp") * 1e9 == pytest.approx(
        i.queue.ns, abs=1e3
    )
    assert sample(text, "aotiserve_compute_seconds_sum", model="mlp") * 1e9 == pytest.approx(
        i.compute_infer.ns, abs=1e3
    )


def test_batched_runs_have_per_batch_size_stats(client, daemon):
    """Bursts of concurrent one- and two-row requests until one run batched several; every
    row ran in exactly one run, and each run is counted under its batch size."""
    rows_sent = requests = 0
    with ThreadPoolExecutor(BATCH_MAX) as pool:
        for _ in range(20):
            burst = [1, 2, 1, 1, 2, 1]
            list(pool.map(lambda r: infer(client, "mlpb", r), burst))
            rows_sent += sum(burst)
            requests += len(burst)
            if any(b.batch_size > 2 for b in stats(client, "mlpb").batch_stats):
                break
    s = stats(client, "mlpb")
    batches = {b.batch_size: b for b in s.batch_stats}
    assert max(batches) > 2, "no run batched several requests"
    assert max(batches) <= BATCH_MAX
    assert sum(size * b.compute_infer.count for size, b in batches.items()) == rows_sent
    assert sum(b.compute_infer.count for b in batches.values()) == s.execution_count
    # The same runs' time, summed per batch size and per device (seconds in between: 1 ns).
    assert sum(b.compute_infer.ns for b in batches.values()) == pytest.approx(
        s.inference_stats.compute_infer.ns, abs=len(batches) + 1
    )
    assert s.inference_count == requests == s.inference_stats.success.count
    assert s.execution_count < s.inference_count
    for b in batches.values():
        assert b.compute_infer.ns > 0
        assert b.compute_input.count == b.compute_output.count == 0  # per request, not per batch

    text = metric_samples(daemon)
    assert sample(text, "aotiserve_batch_size_count", model="mlpb") == s.execution_count
    assert sample(text, "aotiserve_batch_size_sum", model="mlpb") == rows_sent
    for bound in (1, 2, 4, 8):  # the histogram's first buckets: powers of two
        below = sum(b.compute_infer.count for size, b in batches.items() if size <= bound)
        assert (
            sample(
                text, "aotiserve_batch_size_bucket", model="mlpb", le=re.escape(repr(float(bound)))
            )
            == below
        )


def test_all_models_and_errors(client):
    names = [s.name for s in client.get_inference_statistics().model_stats]
    assert names == ["mlp", "mlpb"]
    with pytest.raises(InferenceServerException, match="NOT_FOUND|no model named"):
        client.get_inference_statistics("nope")
    with pytest.raises(InferenceServerException, match="no version"):
        client.get_inference_statistics("mlp", model_version="v999")
    (s,) = client.get_inference_statistics("mlp", model_version="initial").model_stats
    assert s.name == "mlp"
