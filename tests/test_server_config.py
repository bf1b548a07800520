"""Configuration precedence, the serve CLI, admin token, and the built-in demo model."""

from __future__ import annotations

import argparse
import json

import grpc
import pytest
import torch
import wire
from server_harness import REPO_ROOT

from aotiserve.server.buffer_writes import views_fit
from aotiserve.server.cli import build_parser
from aotiserve.server.config import ServeConfig
from aotiserve.v1 import model_runner_pb2 as pb


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    cfg_file = tmp_path / "serve.toml"
    cfg_file.write_text(
        'port = 9000\nmetrics-port = 9001\nmax_queue = 7\ndevices = ["cpu", "cuda:0"]\n'
        'allowed_roots = ["/a"]\n'
    )
    args = build_parser().parse_args(
        [
            "--config",
            str(cfg_file),
            "--port",
            "9100",
            "--allowed-root",
            "/x",
            "--allowed-root",
            "/y",
        ]
    )
    env = {"AOTISERVE_PORT": "9200", "AOTISERVE_METRICS_PORT": "9300", "AOTISERVE_LOG_JSON": "true"}
    cfg = ServeConfig.from_sources(args, env)
    assert cfg.port == 9100  # CLI
    assert cfg.metrics_port == 9300  # env over file
    assert cfg.max_queue == 7 and cfg.devices == ("cpu", "cuda:0")  # file
    assert cfg.allowed_roots == ("/x", "/y")
    assert cfg.log_json is True and cfg.host == "127.0.0.1"  # env, default
    assert ServeConfig.from_sources({}, {"AOTISERVE_METRICS_PORT": "-1"}).metrics_enabled is False
    assert ServeConfig.from_sources({}, {"AOTISERVE_DEVICES": "cpu,cuda:1"}).devices == (
        "cpu",
        "cuda:1",
    )
    assert ServeConfig.from_sources({}, {"AOTISERVE_ADMIN_PORT": "off"}).admin_port is None
    json_file = tmp_path / "serve.json"
    json_file.write_text(json.dumps({"serve": {"runners_per_model": 3}}))
    assert (
        ServeConfig.from_sources(argparse.Namespace(config=str(json_file)), {}).runners_per_model
        == 3
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="unknown setting 'prot'"):
        ServeConfig.from_sources({"config": str(bad)}, {})
    assert ServeConfig().serve_demo and not ServeConfig(model_repository="/m").serve_demo


def test_every_flag_the_help_names_exists_and_sets_a_config_field():
    """A flag that the help text mentions is one users can pass; each sets its field."""
    import re

    parser = build_parser()
    helps = " ".join(action.help or "" for action in parser._actions)
    named = set(re.findall(r"--[a-z0-9][a-z0-9-]+", helps))
    assert named <= set(parser._option_string_actions), named - set(parser._option_string_actions)
    args = parser.parse_args(["--grpc-workers", "12", "--max-streams", "6"])
    config = ServeConfig.from_sources(args, {})
    assert (config.grpc_workers, config.max_streams) == (12, 6)


def test_cpu_block_cache_limit_is_bytes_zero_is_off():
    assert ServeConfig().cpu_block_cache_bytes == 512 << 20
    assert (
        ServeConfig.from_sources(
            build_parser().parse_args(["--cpu-block-cache-bytes", "0"]), {}
        ).cpu_block_cache_bytes
        == 0
    )
    with pytest.raises(ValueError, match="cpu_block_cache_bytes must be >= 0 .* got -1"):
        ServeConfig(cpu_block_cache_bytes=-1)


def test_spreading_runs_is_on_unless_turned_off():
    assert ServeConfig().spread_runs is True
    assert (
        ServeConfig.from_sources(build_parser().parse_args(["--no-spread-runs"]), {}).spread_runs
        is False
    )
    assert ServeConfig.from_sources({}, {"AOTISERVE_SPREAD_RUNS": "0"}).spread_runs is False


def test_time_slice_is_zero_or_within_the_kernels_bounds():
    assert ServeConfig().time_slice_ms == 20.0
    assert ServeConfig.from_sources({}, {"AOTISERVE_TIME_SLICE_MS": "0"}).time_slice_ms == 0
    assert (
        ServeConfig.from_sources(
            build_parser().parse_args(["--time-slice-ms", "5"]), {}
        ).time_slice_ms
        == 5
    )
    for bad in (0.05, 101, -1):
        with pytest.raises(ValueError, match=f"time_slice_ms must be 0 .* got {bad}"):
            ServeConfig(time_slice_ms=bad)


def test_settings_refuse_values_they_do_not_take():
    """A bool that is not one is an error, never a silent false (admin_loopback_only=enabled
    would have turned a security setting off); every refusal names the setting."""
    env = {"AOTISERVE_ADMIN_LOOPBACK_ONLY": "yes"}
    assert ServeConfig.from_sources({}, env).admin_loopback_only is True
    assert (
        ServeConfig.from_sources({}, {"AOTISERVE_ADMIN_LOOPBACK_ONLY": "off"}).admin_loopback_only
        is False
    )
    for key, value, says in [
        ("AOTISERVE_ADMIN_LOOPBACK_ONLY", "enabled", "'admin_loopback_only'"),
        ("AOTISERVE_RUNNERS_PER_MODEL", "two", "'runners_per_model'"),
        ("AOTISERVE_RUNNERS_PER_MODEL", "0", "runners_per_model must be between 1"),
        ("AOTISERVE_PORT", "70000", "port must be between 0 and 65535"),
        ("AOTISERVE_PORT", "-5", "port must be between 0 and 65535"),
        ("AOTISERVE_DEVICES", "gpu:0", "'gpu:0' is not a device"),
        ("AOTISERVE_LOG_LEVEL", "LOUD", "log_level must be"),
        ("AOTISERVE_GPU_SLOT_SPIN_US", "-1", "gpu_slot_spin_us must be between 0 .* got -1"),
        ("AOTISERVE_GPU_SLOT_SPIN_US", "200000", "gpu_slot_spin_us must be between 0"),
    ]:
        with pytest.raises(ValueError, match=says):
            ServeConfig.from_sources({}, {key: value})


def test_admin_token_guards_mutating_rpcs(server_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    s = server_factory(["mlp"], admin_token_file=str(token_file))
    swap = pb.SwapConstantBufferRequest(model="mlp")
    with pytest.raises(grpc.RpcError) as e:
        s.stub.SwapConstantBuffer(swap)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        s.stub.SwapConstantBuffer(swap, metadata=(("authorization", "Bearer nope"),))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:  # authorized, but nothing staged
        s.stub.SwapConstantBuffer(swap, metadata=(("authorization", "Bearer s3cret"),))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Reads need no token.
    s.stub.Run(wire.run_request("mlp", [torch.randn(1, 64)]))
    assert len(s.stub.ListModels(pb.ListModelsRequest()).models) == 1


@pytest.mark.slow
def test_demo_model_is_compiled_once_and_served(server_factory):
    cache = REPO_ROOT / ".cache" / "demo"
    s = server_factory([], demo=True, model_repository=None, demo_cache_dir=str(cache))
    models = s.stub.ListModels(pb.ListModelsRequest()).models
    assert [m.name for m in models] == ["demo"]
    from aotiserve.server.demo import demo_module

    x = torch.randn(3, 8)
    out = wire.outputs(s.stub.Run(wire.run_request("demo", [x])))
    with torch.no_grad():
        assert wire.close(out, [demo_module()(x)])


def test_repository_per_model_config_and_device_variants(tmp_path):
    import model_zoo
    from server_harness import running_server

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "m.pt2").symlink_to(model_zoo.compiled("mlp"))
    (repo / "m.cpu.pt2").symlink_to(model_zoo.compiled("mlp"))  # the package for cpu devices
    (repo / "m.toml").write_text(
        'devices = ["cpu:0", "cpu:1"]\nrunners = 1\nreserve_inactive_buffer = true\n'
    )
    (repo / "only.cpu.pt2").symlink_to(model_zoo.compiled("two_io"))
    with running_server(
        [], model_repository=str(repo), devices=("cpu:0", "cpu:1"), allowed_roots=(str(repo),)
    ) as s:
        models = {m.name: m for m in s.stub.ListModels(pb.ListModelsRequest()).models}
        assert sorted(models) == ["m", "only"]
        assert (
            list(models["m"].devices) == ["cpu:0", "cpu:1"] and models["m"].runners_per_device == 1
        )
        assert list(models["only"].devices) == ["cpu:0", "cpu:1"]
        # m's file reserves its inactive buffers at load, the server's default does not.
        assert s.app.registry.get("m").options.reserve_inactive
        assert not s.app.registry.get("only").options.reserve_inactive
        m = s.app.registry.get("m")
        assert all(views_fit(m.constants, r.runner.extract_constants_map(True)) for r in m.replicas)
        x = torch.randn(2, 64)
        assert wire.close(
            wire.outputs(s.stub.Run(wire.run_request("m", [x]))), model_zoo.eager("mlp", [x])
        )
