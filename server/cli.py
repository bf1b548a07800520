"""``aotiserve serve``: parse flags, set up logging, log the resolved config, run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from . import process_env
from .config import ServeConfig, add_serve_arguments

log = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(config: ServeConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


def build_parser(prog: str = "aotiserve serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve AOTInductor models over gRPC (with no arguments: "
        "the built-in demo model on 127.0.0.1:8500).",
    )
    return add_serve_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        config = ServeConfig.from_sources(args, os.environ)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"aotiserve serve: {exc}\n")  # logging is not set up yet
        return 2
    setup_logging(config)
    # Before torch, OpenMP or any large buffer exists: all of them read these once.
    updates = process_env.threads_env(os.environ, process_env.cpu_count(), config.runners_per_model)
    if config.huge_pages:
        updates.update(process_env.malloc_env(os.environ, process_env.thp_mode()))
    process_env.restart_with_env(os.environ, argv, updates)
    if config.time_slice_ms:  # before the daemon starts its threads: they inherit it
        process_env.set_time_slice(config.time_slice_ms)
    log.info("configuration: %s", json.dumps(config.redacted(), default=str))
    if not config.admin_token_file:
        if config.inference_token_file:
            log.info(
                "no admin token (--admin-token-file): mutating RPCs (weights, load/unload) "
                "are refused"
            )
        elif config.insecure_admin:
            log.warning(
                "--insecure-admin and no token: anyone who reaches port %d can change "
                "what is served",
                config.port,
            )
        else:
            log.info(
                "no admin token (--admin-token-file): mutating RPCs (weights, load/unload) "
                "are taken from loopback only"
            )
    from .app import serve  # imports torch and the extension: after logging is up

    try:
        return serve(config)
    except (OSError, RuntimeError) as exc:  # a port in use, a device that is not there...
        # One line (the traceback only at DEBUG): what stopped the daemon from serving.
        log.error("cannot serve: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
