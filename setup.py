"""Builds aotiserve.runner_ext against the torch that is installed.

Install without build isolation so the extension links the same libtorch
that will load it: ``pip install --no-build-isolation -e .``.
Each backend is its own source file, compiled only where torch has that
backend; the choice is printed when the build starts.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = Path(__file__).parent
CSRC = Path("runner_ext") / "csrc"


def _flag(name: str) -> str | None:
    """AOTISERVE_WITH_<NAME>=0/1 forces a backend off/on; unset means auto."""
    return os.environ.get(f"AOTISERVE_WITH_{name}")


def _wanted(name: str, available: bool) -> bool:
    forced = _flag(name)
    return available if forced is None else forced == "1"


def select_backends() -> list[str]:
    backends = ["cpu"]
    if _wanted("CUDA", torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None):
        backends.append("cuda")
    if _wanted("XPU", getattr(torch.version, "xpu", None) is not None and torch.xpu._is_compiled()):
        backends.append("xpu")
    if _wanted("MPS", sys.platform == "darwin" and torch.backends.mps.is_built()):
        backends.append("mps")
    return backends


GRPCPP_MISSING = (
    "aotiserve: gRPC C++ (grpc++ with pkg-config) is required to build the extension: "
    "install it with `apt-get install libgrpc++-dev pkg-config` (Debian/Ubuntu), "
    "`brew install grpc pkg-config` (macOS) or `conda install -c conda-forge grpc-cpp pkg-config`"
)


def grpcpp_flags() -> tuple[list[str], list[str]]:
    """(cflags, libs) of gRPC C++ from pkg-config; the daemon's port is built on it."""
    try:
        cflags = subprocess.run(
            ["pkg-config", "--cflags", "grpc++"], check=True, capture_output=True, text=True
        ).stdout.split()
        libs = subprocess.run(
            ["pkg-config", "--libs", "grpc++"], check=True, capture_output=True, text=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        sys.exit(GRPCPP_MISSING)
    return cflags, libs


def make_extension():
    backends = select_backends()
    shared = (
        "module",
        "cpu_cache",
        "sigbus",
        "file_window",
        "shared_mapping",
        "core_spread",
        "slot_thread",
        "wire",
        "port_stats",
        "control_queue",
        "bridge",
        "health",
        "batcher",
        "runtime_output",
        "port",
        "port_bindings",
    )
    sources = [str(CSRC / f"{name}.cpp") for name in shared] + [
        str(CSRC / f"{b}.cpp") for b in backends
    ]
    if "cuda" in backends:  # the GPU-direct hand-off's copy kernel (nvcc)
        sources.append(str(CSRC / "cuda_fingerprint.cu"))
    define = [("AOTISERVE_TORCH_VERSION", f'"{torch.__version__}"')]
    extra = {"cxx": ["-O2"]}  # torch.utils.cpp_extension picks the C++ standard torch needs
    grpc_cflags, grpc_libs = grpcpp_flags()
    extra["cxx"] += grpc_cflags
    link = grpc_libs + ["-lcrypto"]
    print(
        f"aotiserve.runner_ext: torch {torch.__version__}, backends {backends}, "
        f"CUDA_HOME={cpp_extension.CUDA_HOME}, "
        f"sources {sources}",
        flush=True,
    )
    (HERE / "runner_ext" / "_build_info.py").write_text(
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\nBACKENDS = {tuple(backends)!r}\n"
    )
    if "cuda" in backends:
        extra["nvcc"] = ["-O3"]
        return cpp_extension.CUDAExtension(
            "aotiserve.runner_ext._C",
            sources,
            define_macros=define,
            extra_compile_args=extra,
            extra_link_args=link,
        )
    if "xpu" in backends:
        return cpp_extension.SyclExtension(
            "aotiserve.runner_ext._C",
            sources,
            define_macros=define,
            extra_compile_args=extra,
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "aotiserve.runner_ext._C",
        sources,
        define_macros=define,
        extra_compile_args=extra,
        extra_link_args=link,
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
