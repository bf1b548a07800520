"""Builds the gRPC C++ echo floor (bench/echo_server.cc) on demand, once per source.

    g++ -O2 -std=c++17 bench/echo_server.cc -o .cache/bench/echo_server-<hash> \\
        $(pkg-config --cflags --libs grpc++) -lpthread

The binary lives in ``.cache/bench/`` (ignored, never committed), named by a hash of
the source, the compiler and the pkg-config flags, so a changed source or gRPC build
is rebuilt and an unchanged one is reused. The same gRPC C++ the extension is built
against is found the same way (pkg-config; PKG_CONFIG_* variables are honoured, as in
bench/gpu_recipe.sh).

    python -m bench.cpp_echo      # build (if needed) and print the binary's path
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .procs import REPO

SOURCE = REPO / "bench" / "echo_server.cc"
CACHE = REPO / ".cache" / "bench"


class Unavailable(RuntimeError):
    """gRPC C++ or a compiler is missing here: the message says which."""


def _pkg_config() -> tuple[list[str], list[str]]:
    if not shutil.which("pkg-config"):
        raise Unavailable("pkg-config is not installed (apt-get install pkg-config)")
    try:
        cflags = subprocess.run(
            ["pkg-config", "--cflags", "grpc++"], check=True, capture_output=True, text=True
        ).stdout
        libs = subprocess.run(
            ["pkg-config", "--libs", "grpc++"], check=True, capture_output=True, text=True
        ).stdout
    except subprocess.CalledProcessError as exc:
        why = (exc.stderr or "").strip().splitlines()
        raise Unavailable(
            "gRPC C++ not found by pkg-config (apt-get install libgrpc++-dev)"
            + (f": {why[0]}" if why else "")
        ) from None
    return shlex.split(cflags), shlex.split(libs)


def binary() -> Path:
    """The echo server's path, compiling it first if this source/toolchain has no build yet."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise Unavailable("no C++ compiler (g++) found")
    cflags, libs = _pkg_config()
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True
    ).stdout.splitlines()[:1]
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr((cxx, version, cflags, libs)).encode()):
        key.update(part)
    out = CACHE / f"echo_server-{key.hexdigest()[:16]}"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = [cxx, "-O2", "-std=c++17", str(SOURCE), "-o", str(tmp), *cflags, *libs, "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise Unavailable(f"building the C++ echo failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    try:
        print(binary())
    except Unavailable as exc:
        print(f"bench.cpp_echo: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
