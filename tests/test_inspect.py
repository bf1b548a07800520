"""`aotiserve inspect PATH.pt2`: one test per reported field, on packages torch made alone
(plain) and with `aotiserve pack`, plus a folded-weights package and the no-torch path."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import model_zoo
import pytest
import torch
from safetensors.torch import save_file

from aotiserve.client import cli
from aotiserve.client import inspect as pkg_inspect


@pytest.fixture(scope="module")
def report():
    """report(zoo name, weights=None) -> the JSON report (cached)."""
    cache = {}

    def get(name: str, weights=None) -> dict:
        key = (name, weights)
        if key not in cache:
            cache[key] = pkg_inspect.inspect_package(model_zoo.compiled(name), weights)
        return cache[key]

    return get


def model_of(report, name: str, model: str = "model") -> dict:
    return next(m for m in report(name)["models"] if m["name"] == model)


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_in_the_package(report):
    assert [m["name"] for m in report("plain_multi")["models"]] == ["model", "static"]
    assert [m["name"] for m in report("plain_mlp")["models"]] == ["model"]


def test_device(report):
    assert model_of(report, "plain_mlp")["device"] == "cpu"
    assert model_of(report, "plain_mlp")["platform"]["AOTI_PLATFORM"]


def test_torch_version(report):
    packed = model_of(report, "mlp")
    assert packed["torch_version"] == torch.__version__  # recorded by aotiserve pack
    plain = model_of(report, "plain_mlp")
    assert plain["torch_version"] is None
    assert "2.13 or later" in plain["torch_version_note"]


def test_inputs_with_dtypes_shapes_and_bounds(report):
    m = model_of(report, "plain_two_io")
    assert m["interface_from"] == "generated wrapper source"
    assert m["inputs"] == [
        {
            "name": "input__0",
            "dtype": "float32",
            "shape": [-1, 16],
            "min_shape": [2, 16],
            "max_shape": [1024, 16],
            "graph_name": "arg3_1",
        },
        {
            "name": "input__1",
            "dtype": "int64",
            "shape": [-1],
            "min_shape": [2],
            "max_shape": [1024],
            "graph_name": "arg4_1",
        },
    ]
    static = model_of(report, "plain_multi", "static")
    assert static["inputs"][0]["shape"] == static["inputs"][0]["min_shape"] == [2, 3, 8, 8]
    nolb = model_of(report, "plain_mlp_nolb")
    assert nolb["inputs"][0]["min_shape"] == [0, 64]  # no lower-bound guard


def test_packed_inputs_keep_their_names_and_get_bounds(report):
    m = model_of(report, "two_io")
    assert m["interface_from"] == "aotiserve pack metadata"
    assert [(s["name"], s["shape"], s["min_shape"], s["max_shape"]) for s in m["inputs"]] == [
        ("x", [-1, 16], [0, 16], [1024, 16]),
        ("ids", [-1], [0], [1024]),
    ]


def test_outputs_with_dtypes_and_shapes(report):
    m = model_of(report, "plain_two_io")
    assert [(s["name"], s["dtype"], s["shape"]) for s in m["outputs"]] == [
        ("output__0", "float32", [-1, 4]),
        ("output__1", "int64", [-1]),
    ]
    static = model_of(report, "plain_static")
    assert [(s["dtype"], s["shape"]) for s in static["outputs"]] == [("float32", [2, 5])]


def test_constants_with_dtype_shape_and_bytes(report):
    consts = {c["fqn"]: c for c in model_of(report, "plain_mlp")["constants"]}
    assert set(consts) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    w = consts["fc1.weight"]
    assert (w["name"], w["dtype"], w["shape"], w["bytes"], w["kind"]) == (
        "fc1_weight",
        "float32",
        [32, 64],
        32 * 64 * 4,
        "Parameter",
    )


def test_swappable_and_computed_at_run_time(report):
    packed = model_of(report, "mlp")  # runtime constant folding on (aotiserve pack)
    assert sorted(packed["swappable"]) == [
        "fc1.bias",
        "fc1.weight",
        "fc2.bias",
        "fc2.weight",
        "scale",
    ]
    runtime = [c["name"] for c in packed["constants"] if c["computed_at_run_time"]]
    assert runtime and all(n.startswith("_FOLDED_CONST_") for n in runtime)
    assert packed["folded_at_compile_time"]["runtime_constant_folding"] is True
    assert packed["warnings"] == []


def test_folded_weights_package(report, tmp_path):
    """Compiled without runtime constant folding (torch's default): the buffer `scale` is
    baked into the code; inspect warns, and names it given the model's weights."""
    m = model_of(report, "plain_mlp")
    assert m["folded_at_compile_time"] == {"runtime_constant_folding": False, "names": None}
    assert "scale" not in m["swappable"]
    assert any("without runtime constant folding" in w and "--weights" in w for w in m["warnings"])
    weights = tmp_path / "mlp.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model_zoo.MODELS["plain_mlp"].module().state_dict().items()},
        str(weights),
    )
    named = pkg_inspect.inspect_package(model_zoo.compiled("plain_mlp"), weights)["models"][0]
    assert named["folded_at_compile_time"]["names"] == ["scale"]
    assert any("these weights are folded: scale" in w for w in named["warnings"])


def test_warnings_batch_lower_bound(report):
    warns = model_of(report, "plain_mlp")["warnings"]
    (lower,) = [w for w in warns if "check_lowerbound" in w]
    assert "'input__0' refuses sizes below 2 in dim 0" in lower and "packaging.pack" in lower
    assert not [
        w for w in model_of(report, "plain_mlp_nolb")["warnings"] if "check_lowerbound" in w
    ]
    assert model_of(report, "plain_mlp")["check_lowerbound"] is True
    assert model_of(report, "plain_mlp_nolb")["check_lowerbound"] is False
    assert model_of(report, "plain_static")["check_lowerbound"] is None  # no dynamic dim


def test_weights_stored(report):
    assert model_of(report, "mlp")["weights_stored"] == "library"
    assert model_of(report, "blob_mlp")["weights_stored"] == "blob"


def test_call_spec(report):
    spec = model_of(report, "plain_two_io")["call_spec"]
    assert json.loads(spec["in_spec"])[0] == 1
    assert "builtins.tuple" in spec["out_spec"]  # a tuple of two outputs


def test_user_metadata(report):
    assert model_of(report, "plain_mlp")["metadata"] == {}  # AOTI_* and aotiserve.* are fields


def test_no_wrapper_source(tmp_path):
    bare = tmp_path / "bare.pt2"
    with (
        zipfile.ZipFile(model_zoo.compiled("plain_mlp")) as zin,
        zipfile.ZipFile(bare, "w") as zout,
    ):
        for info in zin.infolist():
            if not info.filename.endswith(".cpp"):
                zout.writestr(info, zin.read(info))
    (m,) = pkg_inspect.inspect_package(bare)["models"]
    assert m["interface_from"] == "none" and m["inputs"] == [] and m["constants"] == []
    assert any("no generated wrapper source" in w for w in m["warnings"])


def test_cli_text_and_json(capsys):
    path = str(model_zoo.compiled("plain_multi"))
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert "model 'model': compiled for cpu" in out and "model 'static'" in out
    assert "input__0  float32  [-1, 64]  accepts [2..1024, 64]" in out
    assert "fc1.weight" in out and "swappable" in out and "warnings:" in out
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    assert code == 0
    assert [m["name"] for m in json.loads(out)["models"]] == ["model", "static"]


def test_cli_refuses_a_file_that_is_no_package(capsys, tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    code, _, err = run_cli(capsys, "inspect", str(junk))
    assert code == 2 and "not a readable .pt2 package" in err


def test_cli_works_without_torch():
    """The client distribution's inspect imports no torch (importing it raises here)."""
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from aotiserve.client.cli import main\n"
        f"sys.exit(main(['inspect', {str(model_zoo.compiled('plain_two_io'))!r}, '--json']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["models"][0]["inputs"][1]["dtype"] == "int64"
