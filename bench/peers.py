"""Competing servers, each installed into its own venv under ``bench/.peers/``.

``ensure(name)`` installs a peer once (torch==2.13.0 first, so pip takes the
local CPU wheel and never a CUDA build) and returns its interpreter, or a
``Skip`` with the reason. ``start(name, ...)`` serves one AOTI package with it
on 127.0.0.1 and waits for ModelReady. The bench drives them from its own
interpreter with the same client as every other system (grpcio and the generated
Open Inference Protocol classes, bench/driver.py), so no client venv is needed.

Install with ``python -m bench.peers install [kserve pytriton]``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .procs import REPO, Server, free_port, oip_model_ready, spawn, wait_for

log = logging.getLogger(__name__)

PEERS_DIR = REPO / "bench" / ".peers"
TORCH_SPEC = "torch==2.13.0"


@dataclass(frozen=True)
class PeerSpec:
    name: str
    label: str
    packages: tuple[str, ...]
    needs_torch: bool = True
    check_import: str = ""


PEERS = {
    "kserve": PeerSpec(
        "kserve", "KServe 0.21.0 ModelServer", ("kserve==0.21.0",), check_import="kserve"
    ),
    "pytriton": PeerSpec(
        "pytriton",
        "PyTriton 0.7.0 (Triton 2.51)",
        ("nvidia-pytriton==0.7.0",),
        check_import="pytriton.triton",
    ),
}


class Skip(Exception):
    """A peer that cannot be used here; the message says why."""


def venv_python(name: str) -> Path:
    return PEERS_DIR / name / "bin" / "python"


def _works(spec: PeerSpec) -> bool:
    py = venv_python(spec.name)
    if not py.exists():
        return False
    return (
        subprocess.run(
            [str(py), "-c", f"import {spec.check_import}"], capture_output=True
        ).returncode
        == 0
    )


def ensure(name: str, install: bool = True) -> Path:
    """The peer's interpreter, installing it on first use; raises Skip if impossible."""
    spec = PEERS[name]
    if _works(spec):
        return venv_python(name)
    if not install:
        raise Skip(f"{spec.label} is not installed (run `python -m bench.peers install {name}`)")
    venv = PEERS_DIR / name
    logf = PEERS_DIR / f"{name}-install.log"
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    log.info("installing %s into %s (log: %s)", spec.label, venv, logf)
    steps = [[_base_python(), "-m", "venv", str(venv)]]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    if spec.needs_torch:
        steps.append(pip + [TORCH_SPEC])
    steps.append(pip + list(spec.packages))
    with open(logf, "ab") as out:
        for cmd in steps:
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise Skip(f"{spec.label}: `{' '.join(cmd[-3:])}` failed (see {logf})")
    if not _works(spec):
        raise Skip(f"{spec.label} installed but `import {spec.check_import}` fails (see {logf})")
    return venv_python(name)


def _base_python() -> str:
    """A plain interpreter to create venvs with (the one our venv was made from)."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    return str(base if base.exists() else shutil.which("python3"))


def _libdir(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def start(name: str, package: Path, model: str, workdir: Path, timeout: float = 180) -> Server:
    """Serves ``package`` as ``model`` with the peer; returns when ModelReady says true."""
    if name not in ("kserve", "pytriton"):
        raise ValueError(f"unknown peer {name!r}")
    py = ensure(name, install=False)
    grpc_port, http_port = free_port(), free_port()
    env: dict[str, str] = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    argv = [
        str(py),
        str(REPO / "bench" / f"peer_{name}.py"),
        "--package",
        str(package),
        "--model",
        model,
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
    ]
    if name == "pytriton":
        # PyTriton refuses an existing workspace: a fresh TMPDIR, removed at stop.
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="pytriton-", dir=workdir))
        env["TMPDIR"] = str(tmp)
        # Its Python backend stub links the base interpreter's libpython.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [_libdir(py), os.environ.get("LD_LIBRARY_PATH")])
        )
        argv += ["--metrics-port", str(free_port())]
    proc, log_path = spawn(name, argv, workdir, env)
    server = Server(name, proc, grpc_port, workdir, log_path)
    try:
        wait_for(lambda: oip_model_ready(server.target, model), proc, timeout, PEERS[name].label)
    except Exception as exc:
        tail = server.log_tail(15)
        server.stop()
        raise Skip(f"{PEERS[name].label} did not start: {exc}\n{tail}") from None
    return server


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv or argv[0] != "install":
        print(__doc__)
        return 2
    rc = 0
    for name in argv[1:] or list(PEERS):
        try:
            print(name, "->", ensure(name))
        except Skip as exc:
            print(name, "skipped:", exc)
            rc = 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
