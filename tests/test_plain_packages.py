"""Packages made by torch's own aoti_compile_and_package (no `aotiserve pack`) serve as
well as packed ones (issue 18): complete input/output specs from the package's generated
wrapper source, named errors, the dynamic-dim lower-bound guard explained, warm-up."""

from __future__ import annotations

import json
import logging
import zipfile

import grpc
import model_zoo
import pytest
import torch
import wire
from helpers import code_of
from server_harness import running_server

from aotiserve.server import io_specs
from aotiserve.server.device_pool import DevicePool
from aotiserve.server.model_types import ModelState
from aotiserve.v1 import model_runner_pb2 as pb

PLAIN = ("plain_mlp", "plain_mlp_nolb", "plain_two_io", "plain_static")
F32, I64 = pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_INT64

# name -> (inputs, outputs) as [(name, wire dtype, shape)]
EXPECTED = {
    "plain_mlp": ([("input__0", F32, [-1, 64])], [("output__0", F32, [-1, 10])]),
    "plain_mlp_nolb": ([("input__0", F32, [-1, 64])], [("output__0", F32, [-1, 10])]),
    "plain_two_io": (
        [("input__0", F32, [-1, 16]), ("input__1", I64, [-1])],
        [("output__0", F32, [-1, 4]), ("output__1", I64, [-1])],
    ),
    "plain_static": ([("input__0", F32, [2, 3, 8, 8])], [("output__0", F32, [2, 5])]),
}
# name -> per input (min_shape, max_shape), as ListModels' metadata publishes them
BOUNDS = {
    "plain_mlp": [([2, 64], [1024, 64])],
    "plain_mlp_nolb": [([0, 64], [1024, 64])],
    "plain_two_io": [([2, 16], [1024, 16]), ([2], [1024])],
    "plain_static": [([2, 3, 8, 8], [2, 3, 8, 8])],
}


@pytest.fixture(scope="module")
def srv():
    with running_server(PLAIN) as s:
        yield s


def _specs(specs) -> list[tuple]:
    return [(s.name, s.dtype, list(s.shape)) for s in specs]


def test_list_models_has_complete_specs(srv):
    models = {m.name: m for m in srv.stub.ListModels(pb.ListModelsRequest()).models}
    for name, (inputs, outputs) in EXPECTED.items():
        assert _specs(models[name].inputs) == inputs, name
        assert _specs(models[name].outputs) == outputs, name


def test_list_models_metadata_has_dynamic_bounds(srv):
    models = {m.name: m for m in srv.stub.ListModels(pb.ListModelsRequest()).models}
    for name, bounds in BOUNDS.items():
        published = json.loads(models[name].metadata["aotiserve.inputs"])
        assert [(s["min_shape"], s["max_shape"]) for s in published] == bounds, name
        outputs = json.loads(models[name].metadata["aotiserve.outputs"])
        assert [s["name"] for s in outputs] == [o[0] for o in EXPECTED[name][1]]


@pytest.mark.parametrize("name", ["plain_mlp", "plain_two_io", "plain_static"])
def test_run_equals_eager(srv, name):
    inputs = model_zoo.MODELS[name].inputs(3, seed=3)
    resp = srv.stub.Run(wire.run_request(name, inputs))
    out = wire.outputs(resp)
    assert [o.dtype for o in out] == [e.dtype for e in model_zoo.eager(name, inputs)]
    assert wire.close(out, model_zoo.eager(name, inputs))


@pytest.mark.parametrize(
    "name,inputs,where",
    [
        (
            "plain_two_io",
            lambda: [torch.randn(3, 16), torch.zeros(3)],
            "input 1 ('input__1'): dtype",
        ),
        (
            "plain_two_io",
            lambda: [torch.randn(3, 16, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)],
            "input 0 ('input__0'): dtype",
        ),
        (
            "plain_static",
            lambda: [torch.randn(3, 3, 8, 8)],
            "input 0 ('input__0'): dimension 0 must be 2",
        ),
        ("plain_mlp", lambda: [torch.randn(4, 63)], "input 0 ('input__0'): dimension 1 must be 64"),
        ("plain_mlp", lambda: [torch.randn(4)], "input 0 ('input__0'): expected 2 dimensions"),
        (
            "plain_mlp",
            lambda: [torch.randn(2000, 64)],
            "above the largest size the model accepts (1024",
        ),
    ],
)
def test_wrong_dtype_or_shape_names_the_input(srv, name, inputs, where):
    code, details = code_of(lambda: srv.stub.Run(wire.run_request(name, inputs())))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert where in details, details


def test_batch_below_the_lower_bound_explains_how_to_recompile(srv):
    code, details = code_of(
        lambda: srv.stub.Run(wire.run_request("plain_mlp", [torch.randn(1, 64)]))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 0 ('input__0'): dimension 0 is 1" in details
    assert "[2..1024, 64]" in details  # what it accepts
    assert '"aot_inductor.check_lowerbound": False' in details and "packaging.pack" in details
    # The other input of a two-input model is named when it is the one too small.
    code, details = code_of(
        lambda: srv.stub.Run(
            wire.run_request(
                "plain_two_io", [torch.randn(1, 16), torch.zeros(1, dtype=torch.int64)]
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'input__0'" in details


def test_compiled_without_the_lower_bound_check_serves_batch_1(srv):
    inputs = model_zoo.MODELS["plain_mlp_nolb"].inputs(1, seed=1)
    resp = srv.stub.Run(wire.run_request("plain_mlp_nolb", inputs))
    assert wire.close(wire.outputs(resp), model_zoo.eager("plain_mlp_nolb", inputs))


def test_load_logs_one_line_per_input_refusing_small_sizes(caplog):
    with caplog.at_level(logging.WARNING, logger="aotiserve.server.io_specs"):
        with running_server(["plain_two_io", "plain_mlp_nolb"]):
            pass
    lines = [r.getMessage() for r in caplog.records if "accepts only" in r.getMessage()]
    assert len(lines) == 2, lines  # input__0 and input__1 of plain_two_io; none for nolb
    assert all("plain_two_io" in line and "check_lowerbound" in line for line in lines)
    assert any("'input__1' accepts only dim 0 >= 2" in line for line in lines)


def test_two_model_package_serves_each_model(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, inside in (("multi_mlp", "model"), ("multi_static", "static")):
        (repo / f"{name}.pt2").symlink_to(model_zoo.compiled("plain_multi"))
        (repo / f"{name}.toml").write_text(f'package_model = "{inside}"\n')
    with running_server((), model_repository=str(repo)) as srv:
        models = {m.name: m for m in srv.stub.ListModels(pb.ListModelsRequest()).models}
        assert _specs(models["multi_mlp"].inputs) == EXPECTED["plain_mlp"][0]
        assert _specs(models["multi_static"].inputs) == EXPECTED["plain_static"][0]
        assert _specs(models["multi_static"].outputs) == EXPECTED["plain_static"][1]
        inputs = model_zoo.MODELS["plain_static"].inputs(2)
        resp = srv.stub.Run(wire.run_request("multi_static", inputs))
        assert wire.close(wire.outputs(resp), model_zoo.eager("plain_static", inputs))
        code, details = code_of(
            lambda: srv.stub.Run(wire.run_request("multi_mlp", [torch.randn(1, 64)]))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "check_lowerbound" in details


def _without_sources(src, dst) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith(".cpp"):
                zout.writestr(info, zin.read(info))


def test_package_without_source_serves_with_positional_specs(tmp_path, caplog):
    repo = tmp_path / "repo"
    repo.mkdir()
    _without_sources(model_zoo.compiled("plain_mlp"), repo / "bare.pt2")
    with caplog.at_level(logging.WARNING), running_server((), model_repository=str(repo)) as srv:
        (info,) = srv.stub.ListModels(pb.ListModelsRequest()).models
        assert [(s.name, s.dtype, list(s.shape)) for s in info.inputs] == [("input__0", 0, [])]
        inputs = model_zoo.MODELS["plain_mlp"].inputs(3)
        resp = srv.stub.Run(wire.run_request("bare", inputs))
        assert wire.close(wire.outputs(resp), model_zoo.eager("plain_mlp", inputs))
        # The model's own guard still refuses batch 1.
        code, details = code_of(
            lambda: srv.stub.Run(wire.run_request("bare", [torch.randn(1, 64)]))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "too small" in details
    assert any("holds no input/output description" in r.getMessage() for r in caplog.records)


def test_packed_package_gets_bounds_from_its_source(tmp_path):
    with running_server(["mlp"]) as srv:
        (info,) = srv.stub.ListModels(pb.ListModelsRequest()).models
        assert _specs(info.inputs) == [("x", F32, [-1, 64])]
        published = json.loads(info.metadata["aotiserve.inputs"])
        assert (published[0]["min_shape"], published[0]["max_shape"]) == ([0, 64], [1024, 64])


def test_outputs_the_source_leaves_open_are_measured():
    inputs = [io_specs.IOSpec("x", torch.float32, (-1, 4), (2, 4), (8, 4))]
    outputs = [io_specs.IOSpec(n, None, None) for n in ("y", "z", "nz")]
    seen = []

    def run(xs):
        seen.append(tuple(xs[0].shape))
        return [xs[0].sum(1).to(torch.int64), torch.zeros(3), xs[0].nonzero()]

    done = io_specs.probe_outputs(inputs, outputs, run)
    assert seen == [(2, 4), (3, 4)]  # the smallest accepted size, then one more
    # nonzero() of zeros is empty: a data-dependent dim, so dynamic, not a constant 0.
    assert [(o.name, o.dtype, o.shape) for o in done] == [
        ("y", torch.int64, (-1,)),
        ("z", torch.float32, (3,)),
        ("nz", torch.int64, (-1, 2)),
    ]

    def failing(xs):
        raise RuntimeError("no")

    assert io_specs.probe_outputs(inputs, outputs, failing) == outputs


# ---------------------------------------------------------------- warm-up


@pytest.fixture
def record_runs(monkeypatch):
    """Every DevicePool.execute call with the model's state at the time."""
    calls = []
    real = DevicePool.execute

    def execute(self, runner, inputs, short=False):
        calls.append([tuple(t.shape) for t in inputs])
        return real(self, runner, inputs, short)

    monkeypatch.setattr(DevicePool, "execute", execute)
    return calls


def test_ready_only_after_warm_up(record_runs, caplog):
    with (
        caplog.at_level(logging.INFO, logger="aotiserve.server.warmup"),
        running_server(["plain_two_io"], warmup_runs=3, runners_per_model=2) as srv,
    ):
        assert srv.app.registry.get("plain_two_io").state == ModelState.READY
        # 3 rounds x 2 concurrent calls (one per model instance), at the smallest size (on a
        # GPU at a small batch too: io_specs.WARM_UP_SIZES).
        assert record_runs == [[(2, 16), (2,)]] * 6
        srv.stub.Run(wire.run_request("plain_two_io", model_zoo.MODELS["plain_two_io"].inputs(3)))
        # Served by the port's C++ hot path, not through DevicePool.execute.
        assert len(record_runs) == 6
        assert srv.app.metrics.sample("aotiserve_hot_path_requests_total", method="Run") == 1
    assert any("warmed up with 6 run(s) on 1 replica(s)" in r.getMessage() for r in caplog.records)


def test_warm_up_runs_before_the_model_turns_ready(record_runs, monkeypatch):
    """The state seen by each warm-up run: LOADING, never READY."""
    from aotiserve.server.model_registry import ModelRegistry

    seen = []
    real_load = ModelRegistry.load

    def load(self, name, path, options):
        real = DevicePool.execute

        def execute(pool, runner, inputs, short=False):
            seen.append(self._models[name].state)
            return real(pool, runner, inputs, short)

        monkeypatch.setattr(DevicePool, "execute", execute)
        try:
            return real_load(self, name, path, options)
        finally:
            monkeypatch.setattr(DevicePool, "execute", real)

    monkeypatch.setattr(ModelRegistry, "load", load)
    with running_server(["plain_mlp"], warmup_runs=2, runners_per_model=1):
        pass
    assert seen == [ModelState.LOADING, ModelState.LOADING]


def test_warm_up_off(record_runs):
    with running_server(["plain_mlp"], warmup_runs=0):
        pass
    assert record_runs == []


def test_client_sees_bounds_and_infers_at_an_accepted_size(srv, capsys):
    from aotiserve.client import Client, cli

    with Client(srv.target) as client:
        (spec,) = client.model("plain_mlp").info().inputs
    assert (spec.shape, spec.min_shape, spec.max_shape) == ((-1, 64), (2, 64), (1024, 64))
    # `aotiserve infer --random` picks the smallest batch the model accepts (2, not 1).
    code = cli.main(["infer", "--model", "plain_mlp", "--random", "--target", srv.target])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "output__0: float32[2, 10]" in out


def test_warm_up_sizes_on_a_gpu_and_on_the_cpu():
    """On a GPU a small batch too (other cuBLAS paths than one row), clamped into the bounds;
    the CPU and a model without dynamic dims warm at one size."""
    dynamic = [io_specs.IOSpec("x", torch.float32, (-1, 4), (2, 4), (6, 4))]
    on_gpu = io_specs.warm_up_inputs(dynamic, on_gpu=True)
    assert [[tuple(t.shape) for t in s] for s in on_gpu] == [[(2, 4)], [(6, 4)]]
    assert [[tuple(t.shape) for t in s] for s in io_specs.warm_up_inputs(dynamic, False)] == [
        [(2, 4)]
    ]
    static = [io_specs.IOSpec("x", torch.float32, (3, 4))]
    assert len(io_specs.warm_up_inputs(static, on_gpu=True)) == 1
    assert io_specs.warm_up_inputs([io_specs.IOSpec("x", None, None)]) == []
