"""The light `aotiserve-client` distribution: builds from ./client, depends on
grpcio/protobuf/numpy only, and works with torch absent.

(For a fully fresh check by hand: `pip wheel --no-deps ./client -w /tmp/w &&
python -m venv /tmp/v && /tmp/v/bin/pip install /tmp/w/*.whl && /tmp/v/bin/aotiserve --help`.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools builds in the source folder: build a copy, so the tree stays clean.
    source = tmp_path_factory.mktemp("build") / "client"
    shutil.copytree(
        REPO_ROOT / "client",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    # No build isolation: setuptools from this venv, so the test needs no network.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (whl,) = out.glob("aotiserve_client-*.whl")
    return whl


def test_wheel_contents_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    assert "aotiserve/__init__.py" not in names  # a namespace shared with the server
    for module in (
        "client/__init__.py",
        "client/cli.py",
        "client/tensor_codec.py",
        "client/dtypes.py",
        "v1/model_runner_pb2.py",
        "v1/model_runner_pb2_grpc.py",
        "oip/__init__.py",
    ):
        assert f"aotiserve/{module}" in names
    assert not any(n.startswith(("aotiserve/server", "aotiserve/runner_ext")) for n in names)
    requires = [
        line.split(":", 1)[1].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    plain = sorted(r for r in requires if "extra ==" not in r)
    assert plain == ["grpcio>=1.85.1", "numpy>=1.24", "protobuf>=7.35.1"]
    assert any(r.startswith("safetensors") and 'extra == "safetensors"' in r for r in requires)
    assert "aotiserve = aotiserve.client.cli:main" in entry_points


WITHOUT_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # torch absent
    import aotiserve.client as ac
    assert ac.__file__.startswith(sys.argv[1]), ac.__file__
    import numpy as np
    from aotiserve.client.tensor_codec import encode_run_request, from_wire
    from aotiserve.v1 import model_runner_pb2 as pb
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = pb.RunRequest.FromString(encode_run_request("demo", [x])).inputs[0]
    assert (from_wire(t, "numpy") == x).all()
    c = ac.Client("127.0.0.1:1", timeout=2)
    assert c.output_format == "numpy"
    try:
        c.model("demo").run([x])
    except ac.UnavailableError as e:
        print("unavailable", e.code.name)
    from aotiserve.client.cli import main
    print("serve exit", main(["serve"]))
""")


def test_installed_wheel_works_without_torch(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # -S: no .pth processing, so neither the editable repository install nor
    # anything but the wheel provides `aotiserve`; numpy and grpc come from
    # this venv's site-packages.
    site_packages = sysconfig.get_paths()["purelib"]
    code = f"import sys; sys.path[:0] = [{str(target)!r}, {site_packages!r}]\n" + WITHOUT_TORCH
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code, str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "unavailable UNAVAILABLE" in proc.stdout
    assert "serve exit 2" in proc.stdout
    assert "full `aotiserve` distribution" in proc.stderr
