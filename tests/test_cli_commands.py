"""The `aotiserve` operator commands against a real daemon, plus the pieces
that need none: flag/env resolution, `serve` delegation, weights key mapping."""

from __future__ import annotations

import json
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from server_harness import running_server

import aotiserve.client as ac
from aotiserve.client import cli, weights


@pytest.fixture(scope="module")
def srv():
    with running_server(["mlp", "two_io"]) as s:
        yield s


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_table_and_json(srv, capsys):
    code, out, _ = run_cli(capsys, "models", "--target", srv.target)
    assert code == 0
    header, *rows = out.strip().splitlines()
    assert header.split() == ["NAME", "STATE", "DEVICES", "RUNNERS", "VERSION", "STAGED"]
    assert {r.split()[0] for r in rows} == {"mlp", "two_io"}
    assert all("READY" in r and "initial" in r for r in rows)
    code, out, _ = run_cli(capsys, "--json", "--target", srv.target, "models")
    models = json.loads(out)
    assert {m["name"] for m in models} == {"mlp", "two_io"}
    assert models[0]["active_version"]["id"] == "initial"


def test_target_from_environment(srv, capsys, monkeypatch):
    monkeypatch.setenv("AOTISERVE_TARGET", srv.target)
    code, out, _ = run_cli(capsys, "health")
    assert (code, out.strip()) == (0, "SERVING")
    monkeypatch.setenv("AOTISERVE_TARGET", "127.0.0.1:1")  # the flag wins over the environment
    code, out, _ = run_cli(capsys, "health", "--target", srv.target, "--json")
    assert code == 0 and json.loads(out)["status"] == "SERVING"


def test_health_of_an_unreachable_daemon_exits_1(capsys):
    code, _, err = run_cli(capsys, "health", "--target", "127.0.0.1:1", "--timeout", "2")
    assert code == 1 and "UNAVAILABLE" in err


def test_infer_random_and_npy_inputs(srv, capsys, tmp_path, zoo):
    code, out, _ = run_cli(
        capsys, "infer", "--model", "two_io", "--random", "--batch", "3", "--target", srv.target
    )
    assert code == 0
    assert "h: float32[3, 4]" in out and "ids2: int64[3]" in out and "weights initial" in out

    x = zoo.MODELS["mlp"].inputs(2)[0]
    np.save(tmp_path / "x.npy", x.numpy())
    code, out, _ = run_cli(
        capsys,
        "--json",
        "infer",
        "--model",
        "mlp",
        "--input",
        str(tmp_path / "x.npy"),
        "--target",
        srv.target,
        "--save",
        str(tmp_path / "out"),
    )
    assert code == 0
    result = json.loads(out)
    assert result["weights_version"] == "initial"
    (output,) = result["outputs"]
    assert output["shape"] == [2, 10] and output["dtype"] == "float32"
    want = zoo.eager("mlp", [x])[0].numpy()
    np.testing.assert_allclose(
        np.array(output["data"], dtype=np.float32), want, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / f"{output['name']}.npy"), want, rtol=1e-4, atol=1e-5
    )


def test_infer_errors(srv, capsys, tmp_path):
    code, _, err = run_cli(capsys, "infer", "--model", "nope", "--random", "--target", srv.target)
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = run_cli(capsys, "infer", "--model", "mlp", "--target", srv.target)
    assert code == 2 and "--random" in err
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    code, _, err = run_cli(
        capsys,
        "infer",
        "--model",
        "mlp",
        "--input",
        str(tmp_path / "bad.npy"),
        "--target",
        srv.target,
    )
    assert code == 1 and "INVALID_ARGUMENT" in err and "input 0" in err


def test_load_and_unload(srv, capsys):
    code, out, _ = run_cli(
        capsys,
        "load",
        "extra",
        str(srv.repo / "mlp.pt2"),
        "--devices",
        "cpu",
        "--runners-per-device",
        "1",
        "--target",
        srv.target,
    )
    assert code == 0 and "loaded extra on cpu" in out
    code, out, _ = run_cli(capsys, "unload", "extra", "--target", srv.target, "--json")
    assert code == 0 and json.loads(out) == {"unloaded": "extra"}
    code, _, err = run_cli(capsys, "unload", "extra", "--target", srv.target)
    assert code == 1 and "NOT_FOUND" in err


def test_weights_pull_push_rollback_free(srv, capsys, tmp_path, zoo):
    t = ("--target", srv.target)
    pulled = tmp_path / "mlp.safetensors"
    code, out, _ = run_cli(capsys, "weights", "pull", "--model", "mlp", str(pulled), *t)
    assert code == 0 and "wrote 5 tensors" in out
    tensors = load_file(pulled)
    with ac.Client(srv.target) as client:
        want = client.model("mlp").extract_constants_map(False)
    assert set(tensors) == set(want) and all(torch.equal(tensors[k], want[k]) for k in want)

    # keys may be constant names too (fc1_weight) as well as original FQNs
    names = {
        fqn: name
        for name, fqn in ac.Client(srv.target)
        .model("mlp")
        .get_constant_names_to_original_fqns()
        .items()
    }
    new = {names[k] if k.startswith("fc1") else k: v * 0.5 for k, v in tensors.items()}
    new_file = tmp_path / "new.safetensors"
    save_file(new, new_file)
    code, out, err = run_cli(
        capsys,
        "--json",
        "weights",
        "push",
        "--model",
        "mlp",
        str(new_file),
        "--chunk-mib",
        "0.001",
        *t,
    )
    assert code == 0, err
    pushed = json.loads(out)
    assert pushed["active"]["id"] == pushed["staged"]["id"] != "initial"
    assert pushed["active"]["description"] == "new.safetensors"
    x = zoo.MODELS["mlp"].inputs(2)
    scaled = {k: v * 0.5 for k, v in tensors.items()}
    module = zoo.MODELS["mlp"].module()
    module.load_state_dict(scaled)
    with ac.Client(srv.target) as client:
        m = client.model("mlp")
        torch.testing.assert_close(m.run(list(x))[0], module(*x).detach(), rtol=1e-4, atol=1e-5)
        assert m.last_weights_version == pushed["active"]["id"]

    code, out, _ = run_cli(capsys, "weights", "rollback", "--model", "mlp", *t)
    assert code == 0 and "now serves initial" in out
    code, out, _ = run_cli(
        capsys,
        "--json",
        "weights",
        "pull",
        "--model",
        "mlp",
        "--inactive",
        str(tmp_path / "previous.safetensors"),
        *t,
    )
    assert code == 0
    assert json.loads(out)["version"]["id"] == pushed["active"]["id"]  # the previous weights
    assert torch.equal(
        load_file(tmp_path / "previous.safetensors")["fc1.weight"], scaled["fc1.weight"]
    )
    code, out, _ = run_cli(capsys, "weights", "free", "--model", "mlp", *t)
    assert code == 0
    code, _, err = run_cli(capsys, "weights", "rollback", "--model", "mlp", *t)
    assert code == 1 and "FAILED_PRECONDITION" in err


def test_weights_push_refuses_bad_files_before_touching_anything(srv, capsys, tmp_path):
    t = ("--target", srv.target)
    bad = tmp_path / "bad.safetensors"
    save_file({"fc1.weight": torch.zeros(32, 64), "not.a.weight": torch.zeros(2)}, bad)
    code, _, err = run_cli(capsys, "weights", "push", "--model", "two_io", str(bad), *t)
    assert code == 2 and "not.a.weight" in err and "match no constant" in err
    partial = tmp_path / "partial.safetensors"
    save_file({"proj.bias": torch.zeros(4)}, partial)
    code, _, err = run_cli(capsys, "weights", "push", "--model", "two_io", str(partial), *t)
    assert code == 1 and "INVALID_ARGUMENT" in err  # a full update is the default
    wrong_shape = tmp_path / "shape.safetensors"
    save_file({"proj.bias": torch.zeros(5)}, wrong_shape)
    code, _, err = run_cli(
        capsys, "weights", "push", "--model", "two_io", "--partial", str(wrong_shape), *t
    )
    assert code == 1 and "proj.bias" in err
    code, _, err = run_cli(
        capsys, "weights", "push", "--model", "two_io", str(tmp_path / "missing.safetensors"), *t
    )
    assert code == 2
    info = ac.Client(srv.target).model("two_io").info()
    assert info.active_version.id == "initial" and info.staged_version is None


def test_admin_token_file(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("tok\n")
    with running_server(["mlp"], admin_token_file=str(token)) as s:
        pulled = tmp_path / "w.safetensors"
        assert (
            run_cli(capsys, "weights", "pull", "--model", "mlp", str(pulled), "--target", s.target)[
                0
            ]
            == 0
        )
        code, _, err = run_cli(
            capsys, "weights", "push", "--model", "mlp", str(pulled), "--target", s.target
        )
        assert code == 1 and "UNAUTHENTICATED" in err
        code, _, err = run_cli(
            capsys,
            "weights",
            "push",
            "--model",
            "mlp",
            str(pulled),
            "--target",
            s.target,
            "--admin-token-file",
            str(token),
        )
        assert code == 0, err
    empty = tmp_path / "empty"
    empty.write_text("")
    assert run_cli(capsys, "models", "--admin-token-file", str(empty))[0] == 2


def test_token_file(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("for-inference\n")
    with running_server(["mlp"], inference_token_file=str(token)) as s:
        code, _, err = run_cli(capsys, "infer", "--model", "mlp", "--random", "--target", s.target)
        assert code == 1 and "UNAUTHENTICATED" in err
        code, out, _ = run_cli(
            capsys,
            "infer",
            "--model",
            "mlp",
            "--random",
            "--target",
            s.target,
            "--token-file",
            str(token),
        )
        assert code == 0 and "output__0: float32[1, 10]" in out


def test_weights_commands_against_a_separate_admin_port(tmp_path, capsys):
    with running_server(["mlp"], admin_port=0) as s:
        admin = f"127.0.0.1:{s.app.admin_port}"
        pulled = tmp_path / "w.safetensors"
        assert (
            run_cli(capsys, "weights", "pull", "--model", "mlp", str(pulled), "--target", s.target)[
                0
            ]
            == 0
        )
        code, _, err = run_cli(
            capsys, "weights", "push", "--model", "mlp", str(pulled), "--target", s.target
        )
        assert code == 1 and "admin port" in err
        code, out, err = run_cli(
            capsys, "weights", "push", "--model", "mlp", str(pulled), "--target", admin
        )
        assert code == 0, err
        code, out, _ = run_cli(capsys, "models", "--target", admin)  # it serves the rest too
        assert code == 0 and "initial" not in out.splitlines()[1]


def test_serve_delegates_every_flag_to_the_server_cli(monkeypatch):
    seen = []
    fake = types.ModuleType("aotiserve.server.cli")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "aotiserve.server.cli", fake)
    assert cli.main(["serve", "--port", "0", "--help-me", "--target", "x"]) == 7
    assert seen == [["--port", "0", "--help-me", "--target", "x"]]


def test_serve_without_the_server_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "aotiserve.server.cli", None)  # as in aotiserve-client alone
    assert cli.main(["serve"]) == 2
    assert "full `aotiserve` distribution" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["weights", "push", "--model", "m"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    # A deadline of 0 or less, a negative wait: usage errors, not DEADLINE_EXCEEDED later.
    for argv in (
        ["--timeout", "0", "health"],
        ["--timeout", "-1", "list"],
        ["health", "--wait", "-1"],
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2, argv
        assert "must be" in capsys.readouterr().err


# ---------------------------------------------------------------- key mapping

FQNS = {"fc1_weight": "fc1.weight", "fc1_bias": "fc1.bias", "_FOLDED_CONST_x": "_FOLDED_CONST_x"}


def test_map_keys_accepts_fqns_and_constant_names():
    m = weights.map_keys(["fc1.weight", "fc1_bias", "_FOLDED_CONST_x"], FQNS)
    assert m.targets == {"fc1.weight": "fc1.weight", "fc1_bias": "fc1.bias"}
    assert m.skipped == ("_FOLDED_CONST_x",)


def test_map_keys_refuses_unknown_and_duplicate_keys():
    with pytest.raises(
        weights.WeightsFileError, match="fc9.weight.*the model's weights: fc1.bias, fc1.weight"
    ):
        weights.map_keys(["fc9.weight"], FQNS)
    with pytest.raises(weights.WeightsFileError, match="both name constant 'fc1.weight'"):
        weights.map_keys(["fc1.weight", "fc1_weight"], FQNS)


def test_progress_bar_draws_on_a_terminal_only():
    import io

    from aotiserve.client.progress import ProgressBar

    out = io.StringIO()
    with ProgressBar("mlp <- w.safetensors", stream=out, enabled=True) as bar:
        bar(0, 4 << 20)
        bar(4 << 20, 4 << 20)
    text = out.getvalue()
    assert (
        text.startswith("\rmlp <- w.safetensors [") and "100.0%" in text and "4.0/4.0 MiB" in text
    )
    assert text.endswith("\n")
    quiet = io.StringIO()  # StringIO is not a TTY: nothing drawn by default
    with ProgressBar("x", stream=quiet) as bar:
        bar(1, 1)
    assert quiet.getvalue() == ""


def test_commands_do_not_import_torch_when_numpy_will_do(srv, tmp_path):
    # importing torch costs seconds per command; numpy models need none of it
    import subprocess

    code = textwrap.dedent(f"""
        import sys
        from aotiserve.client.cli import main
        t = ["--target", {srv.target!r}]
        w = {str(tmp_path / "w.safetensors")!r}
        assert main(["models", *t]) == 0
        assert main(["infer", "--model", "two_io", "--random", *t]) == 0
        assert main(["weights", "pull", "--model", "mlp", w, *t]) == 0
        assert main(["weights", "push", "--model", "mlp", "--no-swap", w, *t]) == 0
        assert main(["weights", "free", "--model", "mlp", *t]) == 0
        assert "torch" not in sys.modules, "torch was imported"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_saving_weights_into_a_missing_folder_names_the_folder(tmp_path):
    from aotiserve.client.weights import save_safetensors

    target = tmp_path / "missing" / "w.safetensors"
    with pytest.raises(FileNotFoundError, match="missing' does not exist"):
        save_safetensors({"a": np.zeros(2, np.float32)}, target)


def test_pushing_a_corrupt_or_missing_weights_file_is_one_line(tmp_path):
    from aotiserve.client.weights import WeightsFileError, file_upload_items

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    for path, says in ((junk, "not a readable safetensors file"), (tmp_path, "is not a file")):
        with pytest.raises(WeightsFileError, match=says):
            file_upload_items(path, {})
