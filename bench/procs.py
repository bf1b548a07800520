"""Server processes for the bench: start, wait until serving, read memory, stop.

Every server runs in its own process group on 127.0.0.1, is waited on by
polling (a ready file or a readiness RPC, never a fixed sleep), and is stopped
with SIGTERM then SIGKILL to the group, so nothing outlives the bench.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- memory


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM...); 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pid: int) -> dict:
    """VmRSS / VmHWM (MiB) of a server: its own and summed over its process tree."""
    tree = process_tree(pid)
    return {
        "rss_mib": status_kib(pid, "VmRSS") / 1024,
        "hwm_mib": status_kib(pid, "VmHWM") / 1024,
        "tree_rss_mib": sum(status_kib(p, "VmRSS") for p in tree) / 1024,
        "tree_hwm_mib": sum(status_kib(p, "VmHWM") for p in tree) / 1024,
        "tree_pids": len(tree),
    }


def reset_peak_memory(pid: int) -> bool:
    """Sets a process's VmHWM back to its VmRSS (Linux clear_refs 5), so the peak of what
    follows shows; False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def metric(server: Server, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The sum of aotiserve's Prometheus samples called ``name`` whose labels include
    ``labels`` (None: no such sample, or no metrics port)."""
    import urllib.request

    port = server.extra.get("ready", {}).get("metrics_port")
    if not port:
        return None
    want = [f'{k}="{v}"' for k, v in (labels or {}).items()]
    total = None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            base, _, rest = sample.partition("{")
            if base != name or not all(w in rest for w in want):
                continue
            total = (total or 0.0) + float(value)
    return total


# --------------------------------------------------------------------------- processes


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    workdir: Path
    log_path: Path
    pid: int = 0  # the process whose memory we report (the daemon itself)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pid = self.pid or self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def memory(self) -> dict:
        return memory(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        # Whatever is left of the group (Triton's children, stubs) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit", self.name)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn(
    name: str, argv: list[str], workdir: Path, env: dict | None = None
) -> tuple[subprocess.Popen, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(workdir),
            start_new_session=True,
        )
    return proc, log_path


def wait_for(check: Callable[[], object], proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready")
        got = check()
        if got:
            return got
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def _read_ready_file(path: Path):
    def check():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    return check


def start_echo(
    workdir: Path,
    reply: bytes | int,
    workers: int | None = None,
    cpp: bool = False,
    max_msg: int = 160 << 20,
    env: dict | None = None,
    extra_args: list[str] | None = None,
) -> Server:
    """A bare echo floor: bench/echo_server.py (grpcio, ThreadPool(``workers``, default 8)) or,
    with ``cpp``, bench/echo_server.cc (gRPC C++ sync server, ``workers`` pollers, default 32 as
    the daemon's port). It answers every call with ``reply`` (bytes), or with that many zero
    bytes (int)."""
    ready = workdir / "echo.ready"
    workdir.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    if isinstance(reply, int):
        payload = ["--resp-size", str(reply)]
    else:
        reply_file = workdir / "echo.reply"
        reply_file.write_bytes(reply)
        payload = ["--reply-file", str(reply_file)]
    if cpp:
        from . import cpp_echo

        argv = [str(cpp_echo.binary()), "--workers", str(workers or 32), *(extra_args or [])]
    else:
        argv = [
            sys.executable,
            str(REPO / "bench" / "echo_server.py"),
            "--workers",
            str(workers or 8),
        ]
    argv += [*payload, "--ready-file", str(ready), "--max-msg", str(max_msg)]
    name = "echo_cpp" if cpp else "echo"
    proc, log_path = spawn(name, argv, workdir, env)
    info = wait_for(_read_ready_file(ready), proc, 30, f"{name} server")
    return Server(name, proc, int(info["port"]), workdir, log_path)


def start_aotiserve(
    workdir: Path,
    packages: dict[str, Path],
    *,
    runners: int | None = None,
    env: dict | None = None,
    extra_args: list[str] | None = None,
    timeout: float = 180,
) -> Server:
    """Starts the daemon on a model repository holding ``<name>.pt2`` for each package."""
    repo = workdir / "models"
    repo.mkdir(parents=True, exist_ok=True)
    for name, pkg in packages.items():
        link = repo / f"{name}.pt2"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(pkg).resolve())
    ready = workdir / "aotiserve.ready"
    ready.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "aotiserve.server",
        "--model-repository",
        str(repo),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--ready-file",
        str(ready),
    ]
    if runners:
        argv += ["--runners-per-model", str(runners)]
    argv += extra_args or []
    proc, log_path = spawn("aotiserve", argv, workdir, env)
    try:
        info = wait_for(_read_ready_file(ready), proc, timeout, "aotiserve")
    except Exception:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        _kill(proc)
        raise RuntimeError(f"aotiserve did not start: {tail}") from None
    return Server("aotiserve", proc, int(info["port"]), workdir, log_path, extra={"ready": info})


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def oip_model_ready(target: str, model: str) -> bool:
    """ModelReady over the Open Inference Protocol with hand-encoded protobuf bytes,
    so the orchestrator needs no tritonclient (its protobuf pin clashes with ours)."""
    import grpc

    name = model.encode()
    req = b"\x0a" + bytes([len(name)]) + name  # ModelReadyRequest{name=1}
    try:
        with grpc.insecure_channel(target) as ch:
            resp = ch.unary_unary("/inference.GRPCInferenceService/ModelReady")(req, timeout=2)
    except grpc.RpcError:
        return False
    return resp == b"\x08\x01"  # ModelReadyResponse{ready=true}


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
