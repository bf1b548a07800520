"""`aotiserve weights rollout`: two phases across three daemons on loopback.

One daemon failing to stage leaves all three on their old version; all
healthy, all three switch. Target expansion (DNS) and the swap-phase undo
are checked without daemons."""

from __future__ import annotations

import contextlib
import json
import socket

import model_zoo
import pytest
import torch
from helpers import external_ip
from safetensors.torch import save_file
from server_harness import running_server

import aotiserve.client as ac
from aotiserve.client import cli, weights
from aotiserve.client.model_info import WeightsVersion


@contextlib.contextmanager
def three_daemons(third: dict | None = None):
    """Three daemons serving `mlp`; ``third`` overrides the last one's config."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(running_server(["mlp"])) for _ in range(2)]
        servers.append(stack.enter_context(running_server(["mlp"], **(third or {}))))
        yield servers


@pytest.fixture(scope="module")
def new_weights(tmp_path_factory):
    """A safetensors file of scaled mlp weights, and the eager outputs they give."""
    module = model_zoo.MODELS["mlp"].module()
    scaled = {k: v * 0.5 for k, v in module.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "mlp-v2.safetensors"
    save_file(scaled, path)
    module.load_state_dict(scaled)
    x = model_zoo.MODELS["mlp"].inputs(2)
    with torch.no_grad():
        return path, x, module(*x)


def _versions(servers) -> list[str]:
    out = []
    for s in servers:
        with ac.Client(s.target) as c:
            info = c.model("mlp").info()
            assert info.staged_version is None, f"{s.target} still holds staged weights"
            out.append(info.active_version.id)
    return out


def _rollout(capsys, servers, path, *extra):
    targets = ",".join(s.target for s in servers)
    code = cli.main(
        ["--json", "weights", "rollout", "--model", "mlp", str(path), "--targets", targets, *extra]
    )
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_all_healthy_all_switch(capsys, new_weights):
    path, x, want = new_weights
    with three_daemons() as servers:
        code, report, _ = _rollout(capsys, servers, path)
        assert code == 0 and report["ok"] is True
        assert [t["stage"] for t in report["targets"]] == ["ok"] * 3
        assert [t["swap"] for t in report["targets"]] == ["ok"] * 3
        versions = _versions(servers)
        assert "initial" not in versions
        assert [t["version"] for t in report["targets"]] == versions
        for s in servers:
            with ac.Client(s.target) as c:
                m = c.model("mlp")
                torch.testing.assert_close(m.run(list(x))[0], want, rtol=1e-4, atol=1e-5)
                assert m.info().active_version.digest == c.model("mlp").info().active_version.digest


@pytest.mark.parametrize("failure", ["refused by the daemon", "a different model"])
def test_one_failing_stage_means_none_switch(capsys, new_weights, tmp_path, failure):
    path, x, _ = new_weights
    if failure == "refused by the daemon":
        token = tmp_path / "token"
        token.write_text("only-for-admins")
        third = {"admin_token_file": str(token)}
        expected_error = "UNAUTHENTICATED"
    else:  # the third daemon's "mlp" is another network: the file's keys do not fit it
        repo = tmp_path / "repo"
        repo.mkdir()
        (repo / "mlp.pt2").symlink_to(model_zoo.compiled("conv"))
        third = {"model_repository": str(repo), "allowed_roots": (str(repo),)}
        expected_error = "match no constant"
    with three_daemons(third) as servers:
        code, report, _ = _rollout(capsys, servers, path)
        assert code == 1 and report["ok"] is False
        stages = [t["stage"] for t in report["targets"]]
        assert stages == ["ok", "ok", "failed"]
        assert [t["swap"] for t in report["targets"]] == ["discarded", "discarded", "skipped"]
        assert expected_error in report["targets"][2]["error"]
        assert _versions(servers) == ["initial"] * 3
        assert [t["version"] for t in report["targets"]] == ["initial"] * 3
        with ac.Client(servers[0].target) as c:  # still serving the old weights
            torch.testing.assert_close(
                c.model("mlp").run(list(x))[0], model_zoo.eager("mlp", x)[0], rtol=1e-4, atol=1e-5
            )


def test_rollout_table_output_and_unreachable_target(capsys, new_weights):
    path, _, _ = new_weights
    with three_daemons() as servers:
        targets = ",".join([s.target for s in servers[:2]] + ["127.0.0.1:1"])
        code = cli.main(
            [
                "weights",
                "rollout",
                "--model",
                "mlp",
                str(path),
                "--targets",
                targets,
                "--timeout",
                "5",
            ]
        )
        out = capsys.readouterr().out
        assert code == 1
        lines = out.strip().splitlines()
        assert lines[0].split() == ["TARGET", "STAGE", "SWAP", "VERSION", "ERROR"]
        assert "127.0.0.1:1" in lines[3] and "failed" in lines[3] and "UNAVAILABLE" in lines[3]
        assert "FAILED, no target switched" in lines[-1]
        assert _versions(servers[:2]) == ["initial"] * 2


def test_rollout_to_a_dns_name(capsys, new_weights):
    path, _, _ = new_weights
    with running_server(["mlp"]) as s:
        port = s.target.rsplit(":", 1)[1]
        code = cli.main(
            [
                "--json",
                "weights",
                "rollout",
                "--model",
                "mlp",
                str(path),
                "--targets",
                f"localhost:{port}",
            ]
        )
        report = json.loads(capsys.readouterr().out)
        assert code == 0
        assert [t["target"] for t in report["targets"]] == [f"127.0.0.1:{port}"]


def test_the_admin_token_goes_in_plaintext_to_a_remote_target_only_with_insecure(
    capsys, new_weights, tmp_path
):
    """As the rollout Job runs (pod addresses, plain gRPC): refused (exit 2, nothing
    staged) until --insecure says the network is trusted; then every target switches."""
    ip = external_ip()
    if ip is None:
        pytest.skip("no non-loopback address on this machine")
    path, _, _ = new_weights
    token = tmp_path / "admin-token"
    token.write_text("fleet-admin")
    with running_server(["mlp"], host="0.0.0.0", admin_token_file=str(token)) as s:
        target = f"{ip}:{s.target.rsplit(':', 1)[1]}"
        argv = [
            "--json",
            "weights",
            "rollout",
            "--model",
            "mlp",
            str(path),
            "--targets",
            target,
            "--admin-token-file",
            str(token),
        ]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "plaintext" in err and target in err and "--insecure" in err, err
        assert _versions([s]) == ["initial"]
        assert cli.main([*argv, "--insecure"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] and _versions([s]) != ["initial"]
        # Other commands likewise, with either token.
        for flag in ("--admin-token-file", "--token-file"):
            assert cli.main(["--target", target, flag, str(token), "models"]) == 2
            assert "plaintext" in capsys.readouterr().err


# ---------------------------------------------------------------- target expansion


def _fake_resolver(table):
    def resolve(host, port, type=0):
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in table[host]
        ]

    return resolve


def test_resolve_targets():
    r = _fake_resolver(
        {
            "svc": ["10.0.0.3", "10.0.0.1", "10.0.0.2", "10.0.0.1"],
            "dual": ["10.0.0.1", "fd00::1", "10.0.0.2", "fd00::2"],
            "v6": ["fd00::2", "fd00::1"],
        }
    )
    assert weights.resolve_targets("svc:8500", r) == [
        "10.0.0.1:8500",
        "10.0.0.2:8500",
        "10.0.0.3:8500",
    ]
    assert weights.resolve_targets("dual:8500", r) == ["10.0.0.1:8500", "10.0.0.2:8500"]
    assert weights.resolve_targets("v6:8500", r) == ["[fd00::1]:8500", "[fd00::2]:8500"]
    assert weights.resolve_targets("a:1, b:2,a:1", r) == ["a:1", "b:2"]  # a list is taken as given
    assert weights.resolve_targets("10.1.1.1:9", r) == ["10.1.1.1:9"]
    assert weights.resolve_targets("[::1]:9", r) == ["[::1]:9"]
    for bad in ("", "svc", "svc:http", "nosuch:1"):
        with pytest.raises(ValueError):
            weights.resolve_targets(bad, r)


def test_bad_targets_are_usage_errors(capsys, new_weights):
    path, _, _ = new_weights
    assert (
        cli.main(["weights", "rollout", "--model", "mlp", str(path), "--targets", "nohostport"])
        == 2
    )
    assert (
        cli.main(
            [
                "weights",
                "rollout",
                "--model",
                "mlp",
                "/no/such.safetensors",
                "--targets",
                "127.0.0.1:1",
            ]
        )
        == 2
    )


# ---------------------------------------------------------------- swap-phase undo


class _FakeModel:
    def __init__(self, target, log, fail_swap):
        self.target, self.log, self.fail_swap = target, log, fail_swap

    def get_constant_names_to_original_fqns(self):
        return {"fc1_weight": "fc1.weight"}

    def stream_constants(self, items, **kw):
        list(items)
        self.log.append((self.target, "stage"))
        return WeightsVersion("v2", digest="xxh3:abc")

    def swap_constant_buffer(self):
        self.log.append((self.target, "swap"))
        if self.fail_swap:
            raise ac.UnavailableError("draining")
        return WeightsVersion("v2", digest="xxh3:abc")

    def rollback_constant_buffer(self):
        self.log.append((self.target, "rollback"))
        return WeightsVersion("initial")

    def free_inactive_constant_buffer(self):
        self.log.append((self.target, "free"))

    def info(self):
        return ac.ModelInfo(
            "m", "", (), 1, "READY", WeightsVersion("initial"), None, None, (), (), ()
        )


class _FakeClient:
    def __init__(self, target, log, fail_swap):
        self._model = _FakeModel(target, log, fail_swap)

    def model(self, name):
        return self._model

    def close(self):
        pass


def test_a_failed_swap_rolls_back_the_targets_that_swapped(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"fc1.weight": torch.zeros(2)}, path)
    log = []
    ok, outcomes = weights.rollout(
        ["a", "b", "c"], "m", path, lambda t: _FakeClient(t, log, fail_swap=(t == "b"))
    )
    assert not ok
    assert [(o.stage, o.swap) for o in outcomes] == [
        ("ok", "rolled back"),
        ("ok", "failed"),
        ("ok", "rolled back"),
    ]
    assert "draining" in outcomes[1].error
    assert sorted(e for e in log if e[1] in ("rollback", "free")) == [
        ("a", "rollback"),
        ("b", "free"),
        ("c", "rollback"),
    ]
