"""Opens AOTInductor ``.pt2`` packages (or bare ``.so`` files) on a device.

A ``.pt2`` is a zip archive whose ``<archive>/data/aotinductor/<model>/``
folder holds the model's shared library, its ``*_metadata.json``, kernel
binaries (CUDA cubins) and, for packages compiled with
``package_constants_on_disk_format="binary_blob"``, a ``*_weights.blob``.
We extract one model's folder to a private temporary folder, construct our
GIL-free runner on it, and load the weights blob when there is one, which is
what torch's own package loader does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from .backends import runner_class_for

log = logging.getLogger(__name__)

_MODELS_DIR = ("data", "aotinductor")
DEFAULT_MODEL_NAME = "model"


class PackageError(ValueError):
    """The file is not a usable AOTInductor package."""


_ZIP_MAGIC = b"PK\x03\x04"  # a zip's first local file header


def _open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    """The package's zip archive, which must start at the file's first byte: zipfile
    finds an archive behind any prefix, so a file that only ends in a zip (say,
    uploaded weights with one appended) would otherwise open as a package."""
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"model package {str(path)!r} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                raise PackageError(
                    f"model package {str(path)!r} is not a valid .pt2 archive: "
                    "it does not start with a zip header (PK\\x03\\x04)"
                )
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageError(
            f"model package {str(path)!r} is not a valid .pt2 archive: {exc}"
        ) from exc
    first = min((info.header_offset for info in zf.infolist()), default=0)
    if first:
        zf.close()
        raise PackageError(
            f"model package {str(path)!r} is not a valid .pt2 archive: {first} "
            "bytes lie in front of its zip archive"
        )
    return zf


def _model_members(zf: zipfile.ZipFile) -> dict[str, list[zipfile.ZipInfo]]:
    """Groups archive members by model name (the folder under data/aotinductor)."""
    models: dict[str, list[zipfile.ZipInfo]] = {}
    for info in zf.infolist():
        parts = PurePosixPath(info.filename).parts
        # <archive-root>/data/aotinductor/<model>/<file>
        if len(parts) >= 5 and parts[1:3] == _MODELS_DIR and not info.is_dir():
            models.setdefault(parts[3], []).append(info)
    return models


def list_package_models(path: str | os.PathLike) -> list[str]:
    """Names of the models inside a ``.pt2`` package."""
    with _open_zip(path) as zf:
        return sorted(_model_members(zf))


def _select(models: dict[str, list[zipfile.ZipInfo]], path, model_name: str | None):
    if not models:
        raise PackageError(f"model package {str(path)!r} contains no AOTInductor model")
    if model_name is None:
        model_name = (
            DEFAULT_MODEL_NAME
            if DEFAULT_MODEL_NAME in models or len(models) > 1
            else next(iter(models))
        )
    if model_name not in models:
        raise PackageError(
            f"model package {str(path)!r} has no model named {model_name!r} "
            f"(it has: {', '.join(sorted(models))})"
        )
    return model_name, models[model_name]


def _metadata_from(zf: zipfile.ZipFile, members: list[zipfile.ZipInfo]) -> dict[str, str]:
    for info in members:
        name = PurePosixPath(info.filename).name
        if name.endswith("wrapper_metadata.json") or (
            name.endswith("_metadata.json") and "kernel" not in name
        ):
            return {str(k): str(v) for k, v in json.loads(zf.read(info)).items()}
    return {}


def read_package_metadata(path: str | os.PathLike, model_name: str | None = None) -> dict[str, str]:
    """The AOTI metadata (``AOTI_DEVICE_KEY``, user ``aot_inductor.metadata``...)."""
    with _open_zip(path) as zf:
        _, members = _select(_model_members(zf), path, model_name)
        return _metadata_from(zf, members)


def _safe_extract(zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], dest: Path) -> Path:
    """Extracts members flat into dest, refusing names that escape it."""
    for info in members:
        name = PurePosixPath(info.filename).name
        if name in ("", ".", ".."):
            raise PackageError(f"package member {info.filename!r} has an unsafe name")
        with zf.open(info) as src, open(dest / name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return dest


@dataclass
class LoadedModel:
    """A runner together with what it was loaded from. ``close()`` drops it.

    The unpacked package files live as long as the runner itself, not as long as
    this object: ``load_model(pkg).runner`` keeps working after the LoadedModel is
    gone (CUDA loads kernel binaries from them lazily, at a later run).
    """

    runner: Any
    device: torch.device
    source: str
    model_name: str
    metadata: dict[str, str] = field(default_factory=dict)
    _workdir: str | None = None
    _finalizer: Any = field(default=None, repr=False)

    def close(self) -> None:
        # The files go with the runner's last reference (see load_model), not now: a
        # caller may still hold the runner.
        self.runner = None


def _device_of(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, 0)
    return device


def _construct(
    runner_cls,
    so_path: str,
    device: torch.device,
    num_runners: int,
    bin_dir: str,
    run_single_threaded: bool,
):
    if device.type in ("cpu", "mps"):
        return runner_cls(so_path, num_runners, run_single_threaded)
    return runner_cls(so_path, num_runners, str(device), bin_dir, run_single_threaded)


def _runner_from_folder(
    runner_cls,
    folder: Path,
    device: torch.device,
    num_runners: int,
    run_single_threaded: bool,
    what: str,
):
    so_files = sorted(folder.glob("*.so"))
    wrappers = [p for p in so_files if p.name.endswith(".wrapper.so")] or so_files
    if len(wrappers) != 1:
        raise PackageError(
            f"{what} has {len(wrappers)} shared libraries, expected one "
            "(packages holding only C++ sources must be compiled first)"
        )
    runner = _construct(
        runner_cls, str(wrappers[0]), device, num_runners, str(folder), run_single_threaded
    )
    for blob in folder.glob("*_weights.blob"):
        runner.update_constant_buffer_from_blob(str(blob))
    return runner


def load_model(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
    num_runners: int = 1,
    run_single_threaded: bool = False,
) -> LoadedModel:
    """Loads a ``.pt2`` package (one named model of it) or a bare ``.so``.

    ``num_runners`` is the number of model instances inside the container:
    that many ``run`` calls can execute at once.
    """
    if num_runners < 1:
        raise ValueError(f"num_runners must be at least 1, got {num_runners}")
    device = _device_of(device)
    runner_cls = runner_class_for(device.type)
    path = Path(path)
    if path.suffix == ".so":
        if not path.is_file():
            raise PackageError(f"model library {str(path)!r} does not exist or is not a file")
        runner = _construct(
            runner_cls, str(path), device, num_runners, str(path.parent), run_single_threaded
        )
        return LoadedModel(runner, device, str(path), path.stem)

    with _open_zip(path) as zf:
        name, members = _select(_model_members(zf), path, model_name)
        metadata = _metadata_from(zf, members)
        packaged_for = metadata.get("AOTI_DEVICE_KEY")
        if packaged_for and torch.device(packaged_for).type != device.type:
            raise PackageError(
                f"model {name!r} in {str(path)!r} was compiled for {packaged_for!r}, "
                f"not for {str(device)!r}; recompile it for that device"
            )
        workdir = tempfile.mkdtemp(prefix="aotiserve-model-")
        try:
            _safe_extract(zf, members, Path(workdir))
            runner = _runner_from_folder(
                runner_cls,
                Path(workdir),
                device,
                num_runners,
                run_single_threaded,
                f"model {name!r} in {str(path)!r}",
            )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
    loaded = LoadedModel(runner, device, str(path), name, metadata, workdir)
    # The folder lives as long as the runner (a weak reference's callback, run when the
    # runner's last reference goes): CUDA loads cubins lazily, and a runner taken out of
    # its LoadedModel must keep working.
    loaded._finalizer = weakref.finalize(runner, shutil.rmtree, workdir, True)
    return loaded
