"""``aotiserve``: the daemon (``serve``) and the operator commands that talk to it.

    aotiserve serve [flags]                 run the daemon (needs the full distribution)
    aotiserve models                        list models: name, state, devices, weights version
    aotiserve inspect PATH.pt2              what a package holds (no daemon, no torch needed)
    aotiserve infer --model M --random      run a model on random inputs (or --input x.npy ...)
    aotiserve health [--wait S]             the standard gRPC health status
    aotiserve load NAME PATH / unload NAME  model management
    aotiserve weights push|load|pull|rollback|free|rollout ...

Connection flags work before or after the command: ``--target`` (default
$AOTISERVE_TARGET, else localhost:8500), ``--admin-token-file``,
``--token-file``, ``--tls-ca/--tls-cert/--tls-key``, ``--insecure`` (send a token
in plaintext to a non-loopback target), ``--timeout``, ``--json``.
Exit status: 0 done, 1 the server refused or failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TARGET = "localhost:8500"
TARGET_ENV = "AOTISERVE_TARGET"


@dataclass(frozen=True)
class CliConfig:
    """The resolved connection settings (flags, then environment, then defaults)."""

    target: str
    admin_token: str | None
    token: str | None
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None
    tls_server_name: str | None
    timeout: float | None
    json: bool
    insecure: bool = False

    @classmethod
    def resolve(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> CliConfig:
        return cls(
            target=args.target or environ.get(TARGET_ENV) or DEFAULT_TARGET,
            admin_token=_read_token(args.admin_token_file, "admin token"),
            token=_read_token(args.token_file, "token"),
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            timeout=args.timeout,
            json=bool(args.json),
            insecure=bool(getattr(args, "insecure", False)),
        )

    def client(self, target: str | None = None):
        from aotiserve.client.client import Client

        tls = True if (self.tls_ca or self.tls_cert) else None
        return Client(
            target or self.target,
            admin_token=self.admin_token,
            token=self.token,
            tls=tls,
            ca_cert=self.tls_ca,
            client_cert=self.tls_cert,
            client_key=self.tls_key,
            tls_server_name=self.tls_server_name,
            timeout=self.timeout,
            insecure=self.insecure,
        )


def _number(zero_ok: bool):
    """argparse type: a finite number > 0 (>= 0 with ``zero_ok``), else a usage error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(
                f"{text!r} must be {'0 or more' if zero_ok else 'more than 0'}"
            )
        return value

    return parse


def _read_token(path: str | None, what: str) -> str | None:
    if not path:
        return None
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{what} file {path} is empty")
    return token


class UsageError(Exception):
    """Bad flags or files: exit status 2."""


# ---------------------------------------------------------------- parser


def _connection_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    d = argparse.SUPPRESS if suppress else None
    g = parser.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=d,
        metavar="HOST:PORT",
        help=f"daemon address (default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    g.add_argument(
        "--admin-token-file",
        default=d,
        metavar="FILE",
        help="file holding the admin token (sent as 'authorization: Bearer ...')",
    )
    g.add_argument(
        "--token-file",
        default=d,
        metavar="FILE",
        help="file holding the inference token, for a daemon that requires one",
    )
    g.add_argument("--tls-ca", default=d, metavar="FILE", help="CA certificate: use TLS")
    g.add_argument("--tls-cert", default=d, metavar="FILE", help="client certificate (mutual TLS)")
    g.add_argument("--tls-key", default=d, metavar="FILE", help="client private key (mutual TLS)")
    g.add_argument(
        "--tls-server-name",
        default=d,
        metavar="NAME",
        help="expected server name in its certificate (default: the target host)",
    )
    g.add_argument(
        "--insecure",
        default=False if not suppress else d,
        action="store_true",
        help="send the token in plaintext to a target that is not loopback (without "
        "it, a token goes only over TLS or to loopback)",
    )
    g.add_argument(
        "--timeout", default=d, type=_number(False), metavar="SECONDS", help="per-call deadline"
    )
    g.add_argument(
        "--json",
        default=False if not suppress else d,
        action="store_true",
        help="machine-readable output on stdout",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aotiserve",
        description="Serve PyTorch AOTInductor models over gRPC, and operate them.",
        epilog="`aotiserve serve --help` lists the daemon's flags.",
    )
    _connection_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, help: str, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        _connection_flags(p, suppress=True)
        return p

    sub.add_parser("serve", help="run the daemon (flags: aotiserve serve --help)", add_help=False)
    command("models", "list the served models")

    p = command("infer", "run a model once and print its outputs")
    p.add_argument("--model", required=True)
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="FILE.npy",
        help="an input as a .npy file, in input order (repeat for each input)",
    )
    p.add_argument("--random", action="store_true", help="random inputs from the model's specs")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size of random inputs (default: the smallest the model accepts, at least 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs")
    p.add_argument("--save", metavar="DIR", help="also write each output to DIR/<name>.npy")

    p = command(
        "inspect",
        "describe a .pt2 package: models, device, inputs/outputs, constants, "
        "swappable and folded weights, warnings (reads the file; no daemon)",
    )
    p.add_argument("package", metavar="PATH.pt2")
    p.add_argument(
        "--weights",
        metavar="FILE.safetensors",
        help="the model's weights: names the ones folded into code at compile time",
    )

    p = command("health", "print the daemon's health status (exit 0 only when SERVING)")
    p.add_argument("--service", default="", help="service name ('' for the whole server)")
    p.add_argument(
        "--wait", type=_number(True), metavar="SECONDS", help="wait up to this long for SERVING"
    )

    p = command("load", "load a model package (a path on the server)")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument(
        "--devices", default="", help="comma-separated, e.g. cpu,cuda:0 (default: server's)"
    )
    p.add_argument("--runners-per-device", type=int, default=0)
    p.add_argument("--package-model", default="", help="model inside a multi-model package")

    p = command("unload", "stop serving a model (after its in-flight requests)")
    p.add_argument("name")

    weights = command("weights", "push, pull, roll back and roll out model weights")
    wsub = weights.add_subparsers(dest="weights_command", metavar="ACTION")
    wsub.required = True

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p = wsub.add_parser(name, help=help, description=help)
        _connection_flags(p, suppress=True)
        p.add_argument("--model", required=True)
        return p

    def upload_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "file",
            metavar="FILE.safetensors",
            help="keys are original FQNs (fc1.weight) or constant names (fc1_weight)",
        )
        p.add_argument(
            "--partial", action="store_true", help="allow a file that covers only some weights"
        )
        p.add_argument(
            "--description", default="", help="kept with the version (default: file name)"
        )
        p.add_argument(
            "--chunk-mib", type=_number(False), default=None, help="upload chunk size in MiB"
        )

    p = action("push", "stage a safetensors file (validated), then swap it in")
    upload_flags(p)
    p.add_argument(
        "--no-swap", action="store_true", help="stage only; swap later with the runner API"
    )
    p = action(
        "load",
        "have the server stage a safetensors file from its own disk "
        "(below its --allowed-root), then optionally swap it in",
    )
    p.add_argument(
        "path",
        metavar="PATH",
        help="on the server: a .safetensors file, or a folder of shards with "
        "model.safetensors.index.json",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="require the file to cover every weight (default: partial allowed)",
    )
    p.add_argument("--swap", action="store_true", help="swap it in once staged")
    p.add_argument("--description", default="", help="kept with the version (default: file name)")
    p = action("pull", "download the served weights as a safetensors file")
    p.add_argument("out", metavar="OUT.safetensors")
    p.add_argument("--inactive", action="store_true", help="the inactive (staged/previous) buffer")
    action("rollback", "swap back to the previous weights (until they are freed)")
    action("free", "free the inactive buffer (staged or previous weights)")
    p = action("rollout", "stage on every target; only if all succeed, swap every target")
    upload_flags(p)
    p.add_argument(
        "--targets",
        required=True,
        metavar="A:PORT,B:PORT|NAME:PORT",
        help="comma-separated daemons, or one DNS name resolved to all its addresses",
    )
    return parser


# ---------------------------------------------------------------- output


def _print_json(obj: Any, indent: int | None = 2) -> None:
    print(json.dumps(obj, indent=indent, default=str))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _version_dict(v) -> dict | None:
    return (
        None
        if v is None
        else {
            "id": v.id,
            "digest": v.digest,
            "created_unix_ms": v.created_unix_ms,
            "author": v.author,
            "description": v.description,
        }
    )


def _version_text(v) -> str:
    """``id (digest)`` of a version, ``?`` for none."""
    if v is None:
        return "?"
    return f"{v.id} ({v.digest})" if v.digest else v.id


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _as_numpy(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        return x
    try:
        return x.numpy()
    except TypeError:  # bfloat16/float8: widen for display
        return x.float().numpy()


# ---------------------------------------------------------------- commands


def cmd_models(cfg: CliConfig, args) -> int:
    with cfg.client() as client:
        models = client.list_models()
    if cfg.json:
        _print_json([m.to_dict() for m in models])
        return 0
    if not models:
        print("no models loaded")
        return 0
    rows = [
        [
            m.name,
            m.state,
            ",".join(m.devices),
            str(m.runners_per_device),
            m.active_version.id if m.active_version else "-",
            m.staged_version.id if m.staged_version else "-",
        ]
        for m in models
    ]
    print(_table(rows, ["NAME", "STATE", "DEVICES", "RUNNERS", "VERSION", "STAGED"]))
    for m in models:
        if m.error:
            print(f"{m.name}: {m.error}", file=sys.stderr)
    return 0


def _random_inputs(specs, batch: int | None, seed: int) -> list:
    import numpy as np

    from aotiserve.client.dtypes import BY_TORCH_NAME

    rng = np.random.default_rng(seed)
    inputs = []
    for spec in specs:
        # A dynamic dim takes the smallest size the model accepts (a package compiled with
        # torch's default guards refuses 1), dim 0 the batch asked for.
        least = spec.min_shape or (0,) * len(spec.shape)
        shape = tuple(
            (batch if batch is not None else max(least[i], 1))
            if (d < 0 and i == 0)
            else (max(least[i], 1) if d < 0 else d)
            for i, d in enumerate(spec.shape)
        )
        dtype = BY_TORCH_NAME.get(spec.dtype)
        if dtype is None:
            raise UsageError(f"input {spec.name!r} has dtype {spec.dtype}; pass --input files")
        if dtype.torch_name == "bool":
            value = rng.random(shape) > 0.5
        elif dtype.torch_name.startswith(("float", "bfloat")):
            value = rng.standard_normal(shape, dtype=np.float32)
        else:  # small non-negative integers: safe as indices and as values
            value = rng.integers(0, 2, shape)
        if dtype.numpy_name is None:
            import torch  # bfloat16 / float8 inputs need torch

            value = torch.from_numpy(np.asarray(value, dtype=np.float32)).to(
                getattr(torch, dtype.torch_name)
            )
        else:
            value = np.asarray(value, dtype=dtype.numpy_name)
        inputs.append(value)
    return inputs


def cmd_infer(cfg: CliConfig, args) -> int:
    import numpy as np

    from aotiserve.client.dtypes import BY_TORCH_NAME

    if bool(args.input) == bool(args.random):
        raise UsageError("give either --input FILE.npy (once per input) or --random")
    if args.batch is not None and args.batch < 1:
        raise UsageError("--batch must be at least 1")
    with cfg.client() as client:
        model = client.model(args.model)
        info = model.info()
        if args.random:
            if not info.inputs:
                raise UsageError(
                    f"model {args.model!r} publishes no input specs; pass --input files"
                )
            inputs = _random_inputs(info.inputs, args.batch, args.seed)
        else:
            try:
                inputs = [np.load(path, allow_pickle=False) for path in args.input]
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read input: {e}") from None
        started = time.perf_counter()
        # numpy outputs unless one needs torch (bfloat16...): importing torch costs seconds.
        numpy_ok = all(
            BY_TORCH_NAME.get(o.dtype) and BY_TORCH_NAME[o.dtype].numpy_name for o in info.outputs
        )
        outputs = model.run(inputs, output_format="numpy" if numpy_ok and info.outputs else "auto")
        latency_ms = (time.perf_counter() - started) * 1e3
    names = [s.name for s in info.outputs]
    names += [f"output__{i}" for i in range(len(names), len(outputs))]
    arrays = [_as_numpy(o) for o in outputs]
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for name, a in zip(names, arrays):
            np.save(os.path.join(args.save, f"{name}.npy"), a)
    if cfg.json:
        _print_json(
            {
                "model": args.model,
                "weights_version": model.last_weights_version,
                "latency_ms": round(latency_ms, 3),
                "outputs": [
                    {
                        "name": n,
                        "dtype": str(o.dtype).removeprefix("torch."),
                        "shape": list(o.shape),
                        "data": a.tolist(),
                    }
                    for n, o, a in zip(names, outputs, arrays)
                ],
            },
            indent=None,
        )  # tensors: one line, not one line per number
        return 0
    print(f"model {args.model}  weights {model.last_weights_version}  {latency_ms:.2f} ms")
    for n, o, a in zip(names, outputs, arrays):
        print(f"{n}: {str(o.dtype).removeprefix('torch.')}{list(o.shape)}")
        print(np.array2string(a, threshold=50, edgeitems=3, precision=5))
    return 0


def cmd_inspect(cfg: CliConfig, args) -> int:
    from aotiserve.client import inspect

    try:
        report = inspect.inspect_package(args.package, args.weights)
    except inspect.InspectError as e:
        raise UsageError(str(e)) from None
    if cfg.json:
        _print_json(report)
    else:
        print(inspect.render(report))
    return 0


def cmd_health(cfg: CliConfig, args) -> int:
    from aotiserve.client.errors import DeadlineExceededError

    with cfg.client() as client:
        if args.wait is not None:
            try:
                client.wait_until_ready(args.wait, args.service)
            except DeadlineExceededError as e:
                print(f"aotiserve: {e.details}", file=sys.stderr)
        status = client.health(args.service)
    if cfg.json:
        _print_json({"target": cfg.target, "service": args.service, "status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else 1


def cmd_load(cfg: CliConfig, args) -> int:
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    with cfg.client() as client:
        info = client.load_model(
            args.name, args.path, devices, args.runners_per_device, args.package_model
        )
    if cfg.json:
        _print_json(info.to_dict())
    else:
        print(f"loaded {info.name} on {','.join(info.devices)} ({info.state})")
    return 0


def cmd_unload(cfg: CliConfig, args) -> int:
    with cfg.client() as client:
        client.unload_model(args.name)
    if cfg.json:
        _print_json({"unloaded": args.name})
    else:
        print(f"unloaded {args.name}")
    return 0


def _chunk_bytes(args) -> int | None:
    if args.chunk_mib is None:
        return None
    if args.chunk_mib <= 0:
        raise UsageError("--chunk-mib must be positive")
    return max(1, int(args.chunk_mib * (1 << 20)))


def cmd_weights_push(cfg: CliConfig, args) -> int:
    from aotiserve.client import weights
    from aotiserve.client.progress import ProgressBar

    with cfg.client() as client, ProgressBar(f"{args.model} <- {Path(args.file).name}") as bar:
        staged, active = weights.push(
            client,
            args.model,
            args.file,
            partial=args.partial,
            swap=not args.no_swap,
            description=args.description,
            chunk_bytes=_chunk_bytes(args),
            progress=bar,
        )
    if cfg.json:
        _print_json(
            {
                "model": args.model,
                "staged": _version_dict(staged),
                "active": _version_dict(active),
                "bytes": bar.total,
            }
        )
    elif active is None:
        print(f"staged {_version_text(staged)} on {args.model} (not swapped in)")
    else:
        print(
            f"{args.model} now serves {active.id} ({_size(bar.total)}); "
            f"`aotiserve weights rollback --model {args.model}` restores the previous weights"
        )
    return 0


def cmd_weights_load(cfg: CliConfig, args) -> int:
    from aotiserve.client import weights

    with cfg.client() as client:
        staged, active = weights.load(
            client,
            args.model,
            args.path,
            partial=not args.full,
            swap=args.swap,
            description=args.description,
        )
    if cfg.json:
        _print_json(
            {"model": args.model, "staged": _version_dict(staged), "active": _version_dict(active)}
        )
    elif active is None:
        print(f"staged {_version_text(staged)} on {args.model} from {args.path} (not swapped in)")
    else:
        print(
            f"{args.model} now serves {active.id} (from {args.path}); "
            f"`aotiserve weights rollback --model {args.model}` restores the previous weights"
        )
    return 0


def cmd_weights_pull(cfg: CliConfig, args) -> int:
    from aotiserve.client import weights

    with cfg.client() as client:
        version, count = weights.pull(client, args.model, args.out, use_inactive=args.inactive)
    if cfg.json:
        _print_json(
            {
                "model": args.model,
                "file": args.out,
                "tensors": count,
                "version": _version_dict(version),
            }
        )
    else:
        which = version.id if version else "unknown version"
        print(f"wrote {count} tensors of {args.model} ({which}) to {args.out}")
    return 0


def cmd_weights_rollback(cfg: CliConfig, args) -> int:
    with cfg.client() as client:
        active = client.model(args.model).rollback_constant_buffer()
    if cfg.json:
        _print_json({"model": args.model, "active": _version_dict(active)})
    else:
        print(f"{args.model} now serves {active.id if active else '?'}")
    return 0


def cmd_weights_free(cfg: CliConfig, args) -> int:
    with cfg.client() as client:
        client.model(args.model).free_inactive_constant_buffer()
    if cfg.json:
        _print_json({"model": args.model, "freed": True})
    else:
        print(f"freed the inactive buffer of {args.model}")
    return 0


def cmd_weights_rollout(cfg: CliConfig, args) -> int:
    from aotiserve.client import weights

    try:
        targets = weights.resolve_targets(args.targets)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such file")
    ok, outcomes = weights.rollout(
        targets,
        args.model,
        args.file,
        cfg.client,
        partial=args.partial,
        description=args.description,
        chunk_bytes=_chunk_bytes(args),
    )
    if cfg.json:
        _print_json({"model": args.model, "ok": ok, "targets": [o.as_dict() for o in outcomes]})
    else:
        print(
            _table(
                [[o.target, o.stage, o.swap, o.version or "-", o.error] for o in outcomes],
                ["TARGET", "STAGE", "SWAP", "VERSION", "ERROR"],
            )
        )
        print(
            f"rollout of {Path(args.file).name} to {len(targets)} target(s): "
            + ("every target switched" if ok else "FAILED, no target switched")
        )
    return 0 if ok else 1


COMMANDS = {
    "models": cmd_models,
    "infer": cmd_infer,
    "inspect": cmd_inspect,
    "health": cmd_health,
    "load": cmd_load,
    "unload": cmd_unload,
    ("weights", "push"): cmd_weights_push,
    ("weights", "pull"): cmd_weights_pull,
    ("weights", "load"): cmd_weights_load,
    ("weights", "rollback"): cmd_weights_rollback,
    ("weights", "free"): cmd_weights_free,
    ("weights", "rollout"): cmd_weights_rollout,
}


def serve(argv: Sequence[str]) -> int:
    """``aotiserve serve``: every flag is the server's own (aotiserve.server.cli)."""
    try:
        from aotiserve.server.cli import main as server_main
    except ImportError as e:
        if not (e.name or "").startswith("aotiserve.server"):
            raise
        print(
            "aotiserve serve: the daemon is not installed; it ships in the full `aotiserve` "
            "distribution (pip install aotiserve), not in aotiserve-client",
            file=sys.stderr,
        )
        return 2
    return server_main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = CliConfig.resolve(args, os.environ)
    except (OSError, ValueError) as e:
        print(f"aotiserve: {e}", file=sys.stderr)
        return 2
    key = (args.command, args.weights_command) if args.command == "weights" else args.command
    from aotiserve.client.errors import ClientError
    from aotiserve.client.tensor_codec import UnsupportedDtypeError
    from aotiserve.client.weights import WeightsFileError

    try:
        return COMMANDS[key](cfg, args)
    except UsageError as e:
        print(f"aotiserve {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `aotiserve models | head -1`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (WeightsFileError, OSError) as e:
        print(f"aotiserve {args.command}: {e}", file=sys.stderr)
        return 2
    except (ClientError, UnsupportedDtypeError) as e:  # the latter: bfloat16 without torch
        print(f"aotiserve {args.command}: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # e.g. a token refused for a plaintext remote target
        print(f"aotiserve {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
