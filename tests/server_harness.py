"""Start a real aotiserve daemon for tests, in-process or as a subprocess.

In-process (fast; shares the test's process)::

    from server_harness import running_server
    with running_server(["mlp", "two_io"], metrics_port=0) as srv:
        srv.target        # "127.0.0.1:<port>"
        srv.stub          # aotiserve.v1.ModelRunnerStub on a channel to it
        srv.channel       # the grpc.Channel
        srv.app           # aotiserve.server.app.AppServer (registry, plane, metrics_port...)
        srv.repo          # the model repository folder (symlinks to zoo packages)

    running_server(models=(), *, load="now", load_gate=None, providers=None, **config_overrides)
      models: zoo model names; each is served under its own name.
      config_overrides: any ServeConfig field (port defaults to 0, metrics_port to None,
        demo to False, model_roots to (zoo cache,) besides the repository, which the
        repository's links point into, allowed_roots (blob roots) to (repo,)).
      load: "now" (models loaded before the with-body) or "background" (health flips later);
      load_gate: callable the loader calls first (tests that watch health flip block on it).

The pytest fixture ``server_factory`` (conftest.py) wraps it and stops every server at teardown.

Subprocess (real signals)::

    with daemon_process(["mlp"], extra_args=[...]) as d:   # python -m aotiserve.server --port 0
        d.target, d.proc, d.metrics_port, d.ready          # ready: the --ready-file JSON
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import model_zoo

from aotiserve.server.app import AppServer, create_server
from aotiserve.server.config import ServeConfig
from aotiserve.v1 import model_runner_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent


# Temp folders the harness made (repositories, daemon logs): removed at exit.
_temp_dirs: list[Path] = []


def _temp_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _temp_dirs.append(path)
    return path


def make_repository(models: Sequence[str], folder: str | os.PathLike | None = None) -> Path:
    """A model repository folder with a symlink <name>.pt2 per zoo model."""
    folder = Path(folder) if folder else _temp_dir("aotiserve-repo-")
    folder.mkdir(parents=True, exist_ok=True)
    for name in models:
        link = folder / f"{name}.pt2"
        if not link.exists():
            link.symlink_to(model_zoo.compiled(name))
    return folder


@dataclass
class RunningServer:
    app: AppServer
    target: str
    channel: grpc.Channel
    stub: pb_grpc.ModelRunnerStub
    repo: Path
    config: ServeConfig


@contextlib.contextmanager
def running_server(
    models: Sequence[str] = (),
    *,
    load: str = "now",
    load_gate=None,
    providers=None,
    **overrides: Any,
) -> Iterator[RunningServer]:
    repo = make_repository(models)
    settings: dict[str, Any] = dict(
        port=0,
        metrics_port=None,
        demo=False,
        model_repository=str(repo),
        model_roots=(str(model_zoo.cache_dir()),),
        allowed_roots=(str(repo),),
        grace_period_s=5.0,
        drain_delay_s=0.0,
    )
    settings.update(overrides)
    config = ServeConfig(**settings)
    app, port = create_server(config, providers)
    app.start(load=load, load_gate=load_gate)
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )
    try:
        yield RunningServer(app, target, channel, pb_grpc.ModelRunnerStub(channel), repo, config)
    finally:
        channel.close()
        app.stop(0).wait(30)


@dataclass
class DaemonProcess:
    proc: subprocess.Popen
    ready: dict
    repo: Path
    log_path: Path
    target: str = field(init=False)

    def __post_init__(self):
        self.target = f"127.0.0.1:{self.ready['port']}"

    @property
    def metrics_port(self) -> int | None:
        return self.ready.get("metrics_port")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric_samples(self, prefix: str) -> dict[str, float]:
        """The samples on the metrics port whose names start with ``prefix``, by series."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as resp:
            text = resp.read().decode()
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith(prefix)
        }


_daemons: list[subprocess.Popen] = []


@atexit.register
def _kill_leftover_daemons() -> None:
    """A test that failed before its own clean-up must not leave a daemon running, nor
    the session its temp folders."""
    for proc in _daemons:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    for path in _temp_dirs:
        shutil.rmtree(path, ignore_errors=True)


def start_daemon(
    models: Sequence[str],
    extra_args: Sequence[str] = (),
    *,
    repo: Path | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> DaemonProcess:
    repo = make_repository(models, repo)
    work = _temp_dir("aotiserve-daemon-")
    ready_file = work / "ready.json"
    log_path = work / "daemon.log"
    cmd = [
        sys.executable,
        "-m",
        "aotiserve.server",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--model-repository",
        str(repo),
        "--ready-file",
        str(ready_file),
        *extra_args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
        )
    _daemons.append(proc)
    deadline = time.monotonic() + timeout
    # The daemon writes the ready file once SERVING; poll for it (the process, not
    # a port, is what we wait on, so there is nothing to health-check before it).
    while not ready_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"daemon not ready after {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.05)
    return DaemonProcess(proc, json.loads(ready_file.read_text()), repo, log_path)


@contextlib.contextmanager
def daemon_process(
    models: Sequence[str], extra_args: Sequence[str] = (), **kw
) -> Iterator[DaemonProcess]:
    d = start_daemon(models, extra_args, **kw)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(30)
