"""The runner classes, one per backend, with stand-ins for backends not built."""

from __future__ import annotations

from . import _C

_ALL_BACKENDS = {
    "cpu": "AOTIModelContainerRunnerCpu",
    "cuda": "AOTIModelContainerRunnerCuda",
    "xpu": "AOTIModelContainerRunnerXpu",
    "mps": "AOTIModelContainerRunnerMps",
}


def compiled_backends() -> tuple[str, ...]:
    """The device types this build of the extension can run models on."""
    return tuple(_C._compiled_backends)


def _not_compiled(backend: str, class_name: str) -> type:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"aotiserve.runner_ext was not compiled with {backend.upper()} support "
            f"(built backends: {', '.join(compiled_backends())}); rebuild it where torch "
            f"has {backend.upper()} support"
        )

    return type(class_name, (), {"__init__": __init__, "__module__": __name__})


def _runner_class(backend: str) -> type:
    class_name = _ALL_BACKENDS[backend]
    return getattr(_C, class_name, None) or _not_compiled(backend, class_name)


AOTIModelContainerRunnerCpu = _runner_class("cpu")
AOTIModelContainerRunnerCuda = _runner_class("cuda")
AOTIModelContainerRunnerXpu = _runner_class("xpu")
AOTIModelContainerRunnerMps = _runner_class("mps")

_BY_BACKEND = {
    "cpu": AOTIModelContainerRunnerCpu,
    "cuda": AOTIModelContainerRunnerCuda,
    "xpu": AOTIModelContainerRunnerXpu,
    "mps": AOTIModelContainerRunnerMps,
}


def runner_class_for(device_type: str) -> type:
    """The runner class for a device type (``"cpu"``, ``"cuda"``, ...)."""
    try:
        return _BY_BACKEND[device_type]
    except KeyError:
        raise ValueError(
            f"unknown device type {device_type!r}; expected one of {', '.join(_BY_BACKEND)}"
        ) from None
