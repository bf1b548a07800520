"""Every setting of the daemon, resolved once from CLI > env > config file > defaults.

Nothing else in the server reads ``os.environ`` or ``sys.argv``: the CLI
builds a :class:`ServeConfig` with :meth:`ServeConfig.from_sources` and passes
it down. Environment variables are ``AOTISERVE_<FIELD>`` (upper case), config
files are TOML or JSON with the field names as keys (``-`` or ``_``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

ENV_PREFIX = "AOTISERVE_"
MIB = 1 << 20


def _default_demo_cache() -> str:
    return str(Path.home() / ".cache" / "aotiserve" / "demo")


@dataclass(frozen=True)
class ServeConfig:
    """The daemon's settings. Frozen: pass it down, never mutate it."""

    # Network.
    host: str = "127.0.0.1"
    port: int = 8500
    # Prometheus HTTP port: 0 picks a free port, None (or -1) disables metrics.
    metrics_port: int | None = 8502
    # Models.
    model_repository: str | None = None
    devices: tuple[str, ...] = ("cpu",)
    runners_per_model: int = 2
    # Weights: committed versions are persisted below weights_dir (None: not persisted).
    weights_dir: str | None = None
    # LoadModel packages must resolve below one of these or the model repository: folders
    # the daemon never writes (checked at start-up), since loading a package runs its code.
    model_roots: tuple[str, ...] = ()
    # UpdateConstantBufferFromBlob paths must resolve below one of these (empty: refuse all).
    allowed_roots: tuple[str, ...] = ()
    # Mutating RPCs need this token when set, and whenever any token is set.
    admin_token_file: str | None = None
    # When set, every other RPC of the model services needs this token (or the admin one);
    # health and reflection stay open for probes.
    inference_token_file: str | None = None
    # Mutating RPCs only from loopback peers (refused with PERMISSION_DENIED otherwise),
    # with an admin token too. Without any token that is the default, unless insecure_admin.
    admin_loopback_only: bool = False
    # No token at all: accept mutating RPCs from any peer (anyone who reaches the port can
    # then change what is served).
    insecure_admin: bool = False
    # Serve mutating RPCs only on this port (0 picks one), bound on admin_host; the main
    # port then refuses them with PERMISSION_DENIED. None: one port for everything.
    admin_port: int | None = None
    admin_host: str = "127.0.0.1"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    # Resource bounds.
    max_message_bytes: int = 64 * MIB + 64 * 1024
    max_queue: int = 256
    # Inputs of one request (also requested outputs, parameters and raw_input_contents
    # entries of an OIP request), counted by the parsers before they keep anything.
    max_inputs: int = 64
    # Elements of one request tensor (and the largest single dimension of any shape).
    max_tensor_elements: int = 1 << 31
    max_tensor_rank: int = 16
    max_upload_bytes: int = 1 << 40
    # Constants one weight-upload header may declare.
    max_upload_constants: int = 1 << 16
    # Model instances one LoadModel may ask for per device.
    max_runners_per_model: int = 64
    # RPCs handled or waiting for a worker thread at once (beyond: RESOURCE_EXHAUSTED
    # from gRPC), and HTTP/2 streams one connection may open at once (beyond: the
    # client's transport waits).
    max_concurrent_rpcs: int = 1024
    max_concurrent_streams: int = 256
    # Weight uploads (UpdateConstantBuffer) and downloads (ExtractConstantsMap) in progress
    # at once: each holds a worker thread for as long as its client keeps the stream open
    # (a slow or stalled reader too), so they get a share of grpc_workers, never all.
    max_weight_streams: int = 8
    # Long-lived streams open at once, every kind together (health Watch, reflection,
    # ModelStreamInfer, weight uploads and downloads): beyond, RESOURCE_EXHAUSTED. Each
    # but Watch and ModelStreamInfer (a C++ thread of its own) holds a bridge thread while
    # open, so this stays below grpc_workers and unary calls always find one. A stream
    # whose client sends nothing for stream_idle_timeout_s ends (DEADLINE_EXCEEDED); a
    # connection with no call for connection_idle_timeout_s is closed (0: never).
    max_streams: int = 16
    stream_idle_timeout_s: float = 300.0
    connection_idle_timeout_s: float = 0.0
    extract_chunk_bytes: int = 4 * MIB
    # OIP shared memory (server/shared_memory.py): "local" lets clients on this host
    # (loopback, unix socket) register regions, "any" every peer (only where every peer
    # that reaches the port is on this host, e.g. a container's published port), "off" none.
    # At most this many regions, mapping at most this many bytes together.
    shared_memory: str = "local"
    max_shared_memory_regions: int = 64
    max_shared_memory_bytes: int = 1 << 40
    # Dynamic batching (server/batching.py) for models with a dynamic first dimension:
    # most rows in one run (0 or 1: off) and the longest a run waits for others to join.
    batch_max_size: int = 0
    batch_max_delay_us: int = 500
    # Runs on zero inputs shaped from its input specs before a model turns READY, on every
    # replica (server/warmup.py): the first requests then pay no lazy initialisation (CUDA
    # loads kernels at their first launch). 0: off. Per model in its config file.
    warmup_runs: int = 1
    # GPU replicas: each run slot gets a long-lived thread that the warm-up runs on and every
    # later run of that slot is handed to, instead of running on whichever gRPC thread took
    # the request (runner_ext/csrc/cuda.cpp). No effect on the CPU. On by default: with the
    # spinning hand-off below, a small model's p50 on an H100 is 175-240 µs lower (bench.gpu).
    gpu_slot_threads: bool = True
    # With gpu_slot_threads: how long the slot's thread looks for its next run after one, and
    # a request's thread for its result, before either sleeps (runner_ext/csrc/slot_thread.h).
    # Spinning keeps a small model's hand-off at a few µs while requests keep coming, for a
    # core per busy slot; 0: sleep at once.
    gpu_slot_spin_us: int = 1000
    grpc_workers: int = 32
    # The daemon restarts itself with malloc and torch's allocator set for payloads
    # (server/process_env.py): transparent huge pages (large tensors copy several times
    # faster into fresh memory) and malloc's mmap/trim thresholds (MiB-sized messages reuse
    # heap memory). False: both allocators as the environment leaves them.
    huge_pages: bool = True
    # Freed CPU blocks of 32 MiB or more (which glibc would unmap, and map and zero afresh
    # for the next request) are kept for reuse up to this many bytes (runner_ext
    # cpu_cache.cpp); a request that fits none first gives them all back. 0: off.
    cpu_block_cache_bytes: int = 512 * MIB
    # A long (>= 1 ms) single-threaded CPU run that starts while another is in flight is
    # pinned, while it runs, to the core with the fewest such runs (runner_ext
    # core_spread.cpp): two compute-bound runs then never share a core while another idles.
    # A run alone, and runs of several intra-op threads, are left alone.
    spread_runs: bool = True
    # The CPU time the kernel lets each of the daemon's threads run before a waking thread
    # may preempt it (Linux >= 6.12, EEVDF; server/process_env.py). Longer than the kernel's
    # default, a model's run is cut less often by clients and I/O threads on the same cores.
    # 0: the kernel's default.
    time_slice_ms: float = 20.0
    # Give each model's inactive weights buffer its memory at load (a copy of the weights):
    # the first upload then writes in place like every later one, and a model whose two
    # buffers don't fit fails at load, not at its first upload. Per model in its config file
    # (reserve_inactive_buffer = true).
    reserve_inactive_buffer: bool = False
    grace_period_s: float = 10.0
    # After SIGTERM, new calls get UNAVAILABLE for at least this long before the
    # transport closes (a call arriving as the transport closes would see CANCELLED).
    drain_delay_s: float = 1.0
    # Logging.
    log_json: bool = False
    log_level: str = "INFO"
    # Demo model: None means "serve it when no model repository is given".
    demo: bool | None = None
    demo_cache_dir: str = field(default_factory=_default_demo_cache)
    # Written as JSON {"port", "metrics_port"} once the server is SERVING.
    ready_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "admin_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(
                    f"{name} must be between 0 and 65535 (0: any free port), got {value}"
                )
        if not 1 <= self.runners_per_model <= self.max_runners_per_model:
            raise ValueError(
                f"runners_per_model must be between 1 and max_runners_per_model "
                f"({self.max_runners_per_model}), got {self.runners_per_model}"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(
                f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}"
            )
        for device in self.devices:
            kind, _, index = device.partition(":")
            if kind not in ("cpu", "cuda", "xpu", "mps") or (index and not index.isdigit()):
                raise ValueError(
                    f"devices: {device!r} is not a device (cpu, cuda, cuda:N, xpu:N or mps)"
                )
        if not 0 <= self.gpu_slot_spin_us <= 100_000:
            raise ValueError(
                f"gpu_slot_spin_us must be between 0 (sleep at once) and 100000, "
                f"got {self.gpu_slot_spin_us}"
            )
        for name in ("batch_max_size", "batch_max_delay_us", "warmup_runs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.cpu_block_cache_bytes < 0:
            raise ValueError(
                f"cpu_block_cache_bytes must be >= 0 (0: off), got {self.cpu_block_cache_bytes}"
            )
        if self.time_slice_ms and not 0.1 <= self.time_slice_ms <= 100:
            raise ValueError(
                f"time_slice_ms must be 0 (the kernel's default) or between 0.1 and "
                f"100 (the kernel's bounds), got {self.time_slice_ms}"
            )
        if not 1 <= self.max_streams < self.grpc_workers:
            raise ValueError(
                f"max_streams must be at least 1 and below grpc_workers ({self.grpc_workers}), "
                f"so streams never hold every bridge thread; got {self.max_streams}"
            )
        if self.stream_idle_timeout_s < 0 or self.connection_idle_timeout_s < 0:
            raise ValueError("stream_idle_timeout_s and connection_idle_timeout_s must be >= 0")
        if self.shared_memory not in ("local", "any", "off"):
            raise ValueError(f"shared_memory must be local, any or off, got {self.shared_memory!r}")
        if not 1 <= self.max_weight_streams < self.grpc_workers:
            raise ValueError(
                f"max_weight_streams must be at least 1 and below grpc_workers "
                f"({self.grpc_workers}), so weight streams never hold every worker thread; "
                f"got {self.max_weight_streams}"
            )
        for name in (
            "max_inputs",
            "max_tensor_rank",
            "max_tensor_elements",
            "max_upload_constants",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        self._check_model_roots()

    @property
    def package_roots(self) -> tuple[str, ...]:
        """The folders LoadModel takes packages from: the model roots and the repository."""
        return self.model_roots + ((self.model_repository,) if self.model_repository else ())

    def written_folders(self) -> list[tuple[str, str]]:
        """(what, folder) for each folder the daemon writes files into."""
        out = []
        if self.weights_dir:
            out.append(("the weights folder (weights_dir)", self.weights_dir))
        if self.serve_demo:
            out.append(("the demo cache (demo_cache_dir)", self.demo_cache_dir))
        return out

    def _check_model_roots(self) -> None:
        """No model root may equal, contain or lie inside a folder the daemon writes (a
        package there could be bytes a client uploaded), nor hold the temp folder where
        packages unpack."""
        roots = [(r, _real(r)) for r in self.package_roots]
        for what, folder in self.written_folders():
            real = _real(folder)
            for root, root_real in roots:
                if _overlap(root_real, real):
                    raise ValueError(
                        f"model root {root!r} overlaps {what} {folder!r}: the daemon writes "
                        "there, and packages load only from folders it never writes; keep "
                        "them apart"
                    )
        tmp = _real(tempfile.gettempdir())
        for root, root_real in roots:
            if root_real == tmp or root_real in tmp.parents:
                raise ValueError(
                    f"model root {root!r} holds the temp folder {str(tmp)!r}, where the daemon "
                    "unpacks packages; name a folder below it instead"
                )

    @property
    def serve_demo(self) -> bool:
        return self.demo if self.demo is not None else self.model_repository is None

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_port is not None and self.metrics_port >= 0

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict fit for the log (no secrets: only the token's path)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_sources(
        cls,
        args: argparse.Namespace | Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        config_file: str | os.PathLike | None = None,
    ) -> ServeConfig:
        """CLI values (non-None) > ``AOTISERVE_*`` env > config file > defaults."""
        values: dict[str, Any] = {}
        cli = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        config_file = config_file or cli.get("config") or (env or {}).get(ENV_PREFIX + "CONFIG")
        if config_file:
            values.update(_read_config_file(Path(config_file)))
        for f in dataclasses.fields(cls):
            raw = (env or {}).get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = raw
        for f in dataclasses.fields(cls):
            if cli.get(f.name) is not None:
                values[f.name] = cli[f.name]
        return cls(**{k: _coerce(k, v) for k, v in values.items()})


_FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)}


def _real(path: str) -> Path:
    return Path(os.path.realpath(path))


def _overlap(a: Path, b: Path) -> bool:
    """Whether one of the two folders is, or lies inside, the other."""
    return a == b or a in b.parents or b in a.parents


def _read_config_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    if "serve" in data and isinstance(data["serve"], dict):
        data = data["serve"]
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise ValueError(f"config file {str(path)!r}: unknown setting {key!r}")
        out[name] = value
    return out


def _coerce(name: str, value: Any) -> Any:
    """Turns env/file strings into the field's type; a value that is not one names the setting."""
    if name not in _FIELDS:
        raise ValueError(f"unknown setting {name!r}")
    try:
        return _convert(name, value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"setting {name!r}: {value!r} is not valid ({exc})") from None


def _convert(name: str, value: Any) -> Any:
    default = _FIELDS[name].default
    if name in ("devices", "allowed_roots", "model_roots"):
        if isinstance(value, str):
            sep = os.pathsep if name != "devices" and os.pathsep in value else ","
            value = [v.strip() for v in value.split(sep) if v.strip()]
        return tuple(str(v) for v in value)
    if name in ("metrics_port", "admin_port"):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "off")):
            return None
        value = int(value)
        return None if value < 0 else value
    if name == "demo":
        return None if value is None else _bool(value)
    if isinstance(default, bool):
        return _bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return None if value is None else str(value)


def _bool(value: Any) -> bool:
    """true/false, yes/no, on/off, 1/0; anything else is an error, never a silent false
    (a security setting such as admin_loopback_only must not turn off by a typo)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
    raise ValueError("expected true or false (also yes/no, on/off, 1/0)")


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``serve`` flags. Every default is None so env/file values show through."""
    a = parser.add_argument
    a("--config", help="TOML or JSON config file")
    a("--host", help="address to bind (default 127.0.0.1)")
    a("--port", type=int, help="gRPC port (default 8500; 0 picks a free one)")
    a("--metrics-port", type=int, help="Prometheus port (default 8502; 0 picks one; -1 disables)")
    a("--model-repository", help="folder of <name>.pt2 packages to serve")
    a("--devices", help="comma-separated devices, e.g. cpu,cuda:0")
    a("--runners-per-model", type=int, help="model instances per replica (default 2)")
    a("--weights-dir", help="folder where committed weight versions are persisted")
    a(
        "--model-root",
        dest="model_roots",
        action="append",
        help="folder below which LoadModel packages may lie, besides --model-repository "
        "(repeatable; never a folder the daemon writes)",
    )
    a(
        "--allowed-root",
        dest="allowed_roots",
        action="append",
        help="folder below which UpdateConstantBufferFromBlob paths may lie (repeatable)",
    )
    a("--admin-token-file", help="file holding the admin token for mutating RPCs")
    a(
        "--inference-token-file",
        help="file holding a token every non-admin RPC needs (health and reflection excepted); "
        "mutating RPCs then need the admin token",
    )
    a(
        "--admin-loopback-only",
        action="store_const",
        const=True,
        help="accept mutating RPCs only from loopback peers, with the admin token too",
    )
    a(
        "--insecure-admin",
        action="store_const",
        const=True,
        help="with no token configured, accept mutating RPCs from any peer (by default only "
        "from loopback)",
    )
    a(
        "--admin-port",
        type=int,
        help="serve mutating RPCs only on this port (0 picks one; -1: on the main port)",
    )
    a("--admin-host", help="address the admin port binds (default 127.0.0.1)")
    a("--tls-cert", help="server certificate (PEM)")
    a("--tls-key", help="server private key (PEM)")
    a("--tls-ca", help="CA bundle: clients must present a certificate it signed (mTLS)")
    a("--max-message-bytes", type=int, help="largest gRPC message accepted or sent")
    a("--max-queue", type=int, help="requests waiting per device pool before RESOURCE_EXHAUSTED")
    a("--max-upload-bytes", type=int, help="largest total of one weight upload")
    a(
        "--max-inputs",
        type=int,
        help="most inputs of one request (default 64; also OIP requested outputs, parameters "
        "and raw_input_contents entries)",
    )
    a(
        "--max-tensor-elements",
        type=int,
        help="largest element count of one request tensor, and largest single dimension",
    )
    a("--max-tensor-rank", type=int, help="most dimensions of one request tensor")
    a(
        "--max-upload-constants",
        type=int,
        help="most constants one weight-upload header may declare (default 65536)",
    )
    a("--max-runners-per-model", type=int, help="most model instances LoadModel may ask for")
    a(
        "--max-concurrent-rpcs",
        type=int,
        help="RPCs in progress at once before RESOURCE_EXHAUSTED (default 1024)",
    )
    a(
        "--max-concurrent-streams",
        type=int,
        help="HTTP/2 streams per client connection at once (default 256)",
    )
    a(
        "--grpc-workers",
        type=int,
        help="threads that stay ready to serve calls on the port between requests (more start "
        "under load, up to --max-concurrent-rpcs; default 32)",
    )
    a(
        "--max-streams",
        type=int,
        help="long-lived streams open at once, all kinds (health Watch, reflection, stream "
        "infer, weight streams); below --grpc-workers",
    )
    a(
        "--stream-idle-timeout-s",
        type=float,
        help="end a stream whose client sent nothing this long (0: never)",
    )
    a(
        "--connection-idle-timeout-s",
        type=float,
        help="close a connection with no call this long (0: never)",
    )
    a(
        "--max-weight-streams",
        type=int,
        help="weight uploads and downloads in progress at once, below --grpc-workers (default 8)",
    )
    a(
        "--shared-memory",
        choices=("local", "any", "off"),
        help="who may register OIP shared-memory regions: clients on this host (local, the "
        "default), any peer, or nobody",
    )
    a("--max-shared-memory-regions", type=int, help="regions registered at once (default 64)")
    a(
        "--max-shared-memory-bytes",
        type=int,
        help="bytes all registered regions may map together (default 1 TiB)",
    )
    a(
        "--batch-max-size",
        type=int,
        help="dynamic batching: most rows in one run, for models with a dynamic first "
        "dimension (default 0: off)",
    )
    a(
        "--batch-max-delay-us",
        type=int,
        help="dynamic batching: longest a run waits for others to join (default 500)",
    )
    a(
        "--warmup-runs",
        type=int,
        help="runs on zero inputs shaped from the model's specs, per replica, before a model "
        "turns READY (default 1; 0: off)",
    )
    a(
        "--no-huge-pages",
        dest="huge_pages",
        action="store_const",
        const=False,
        help="leave malloc and torch's allocator as the environment sets them (no transparent "
        "huge pages, no malloc thresholds)",
    )
    a(
        "--cpu-block-cache-bytes",
        type=int,
        help="keep freed CPU blocks of 32 MiB or more for reuse, up to this many bytes (default "
        "512 MiB; 0: off)",
    )
    a(
        "--no-spread-runs",
        dest="spread_runs",
        action="store_const",
        const=False,
        help="leave long single-threaded CPU runs where the scheduler puts them (by default "
        "one that starts beside another is pinned, while it runs, to the core with the "
        "fewest such runs)",
    )
    a(
        "--gpu-slot-threads",
        action="store_const",
        const=True,
        help="run each GPU request on a thread of its run slot, set up by the warm-up, "
        "instead of on the gRPC thread that took it (the default; no effect on the CPU)",
    )
    a(
        "--no-gpu-slot-threads",
        dest="gpu_slot_threads",
        action="store_const",
        const=False,
        help="run each GPU request on the gRPC thread that took it",
    )
    a(
        "--gpu-slot-spin-us",
        type=int,
        help="microseconds a slot's thread and a request's thread spin for the hand-off "
        "before sleeping (default 1000; 0: sleep at once)",
    )
    a(
        "--reserve-inactive-buffer",
        action="store_const",
        const=True,
        help="give every model's inactive weights buffer its memory at load (first uploads as "
        "fast as later ones; twice the weights' memory from the start)",
    )
    a(
        "--time-slice-ms",
        type=float,
        help="CPU time a thread runs before a waking one may preempt it (Linux >= 6.12; "
        "default 20, 0: the kernel's)",
    )
    a("--grace-period-s", type=float, help="seconds in-flight calls get after SIGTERM")
    a("--log-json", action="store_const", const=True, help="one JSON object per log line")
    a("--log-level", help="DEBUG, INFO, WARNING...")
    a("--demo", action="store_const", const=True, help="also serve the built-in demo model")
    a("--ready-file", help='write {"port", "metrics_port"} here once serving')
    return parser
