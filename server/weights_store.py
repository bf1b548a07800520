"""Durable weight versions: what a restarted daemon serves.

Layout below ``weights_dir``::

    <model>/versions/<id>.safetensors   every staged version (full set of updatable constants)
    <model>/versions/<id>.json          its WeightsVersion
    <model>/current.json                the committed (serving) version id

Every file is written to a temp name, fsynced, renamed, and the folder
fsynced, so a crash at any point leaves either the old or the new file.
A version is staged to disk before it can be swapped in, so committing is
one small atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model_types import WeightsVersion

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name) or "_"


_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _folder(model: str) -> str:
    """One folder per model name, inside the weights folder.

    Plain names are used as they are. Others ("..", "a b") get their unsafe characters
    replaced and a digest of the real name appended, so two models never share a folder
    ("a b" and "a_b") and no name leads outside the weights folder ("..").
    """
    if _PLAIN.fullmatch(model):
        return model
    digest = hashlib.sha256(model.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{_safe(model).lstrip('.')}~{digest}"


def version_json(version: WeightsVersion) -> dict:
    return {
        "id": version.id,
        "digest": version.digest,
        "created_unix_ms": version.created_unix_ms,
        "author": version.author,
        "description": version.description,
    }


def version_from_json(data: Mapping) -> WeightsVersion:
    return WeightsVersion(
        str(data["id"]),
        # Versions recorded before digests named their algorithm hold a hex "sha256".
        str(data["digest"]) if "digest" in data else f"sha256:{data['sha256']}",
        int(data["created_unix_ms"]),
        str(data.get("author", "")),
        str(data.get("description", "")),
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class WeightsStore:
    """One model's files are touched by one call at a time: a load's clean-up of
    temp files (or a prune) must never delete a write that is still under way."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _model_dir(self, model: str) -> Path:
        return self.root / _folder(model)

    @contextmanager
    def _locked(self, model: str) -> Iterator[None]:
        with self._locks_lock:
            lock = self._locks.setdefault(_folder(model), threading.Lock())
        with lock:
            yield

    def save_version(
        self, model: str, version: WeightsVersion, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Writes a staged version's full weights (host copies are made as needed)."""
        versions = self._model_dir(model) / "versions"
        host = {
            k: (v if v.device.type == "cpu" else v.cpu()).contiguous() for k, v in tensors.items()
        }
        with self._locked(model):
            _atomic_write(
                versions / f"{_safe(version.id)}.safetensors",
                lambda tmp: save_file(host, tmp, metadata={"version": version.id}),
            )
            _atomic_write(
                versions / f"{_safe(version.id)}.json",
                lambda tmp: Path(tmp).write_text(json.dumps(version_json(version))),
            )

    def commit(self, model: str, version: WeightsVersion) -> None:
        """Makes ``version`` the one a restart serves."""
        with self._locked(model):
            _atomic_write(
                self._model_dir(model) / "current.json",
                lambda tmp: Path(tmp).write_text(json.dumps(version_json(version))),
            )
        log.info("model %r: committed weights version %s", model, version.id)

    def committed(self, model: str) -> tuple[WeightsVersion, dict[str, torch.Tensor] | None] | None:
        """The committed version and its tensors (None for the packaged weights), or None.

        Called when the model loads: also removes temp files a crash left mid-write.
        """
        with self._locked(model):
            self._remove_temp_files(model)
            current = self._model_dir(model) / "current.json"
            if not current.exists():
                return None
            version = version_from_json(json.loads(current.read_text()))
            if version.id == "initial":
                return version, None
            path = self._model_dir(model) / "versions" / f"{_safe(version.id)}.safetensors"
            return version, load_file(str(path))

    def _remove_temp_files(self, model: str) -> None:
        folder = self._model_dir(model)
        for sub in (folder, folder / "versions"):
            if sub.is_dir():
                for path in sub.glob(".*.tmp"):
                    log.info("removing %s, left by an interrupted write", path)
                    path.unlink(missing_ok=True)

    def prune(self, model: str, keep: set[str]) -> None:
        """Deletes stored versions not in ``keep`` (ids)."""
        versions = self._model_dir(model) / "versions"
        wanted = {_safe(k) for k in keep}
        with self._locked(model):
            if not versions.is_dir():
                return
            for path in versions.iterdir():
                if path.name.startswith("."):
                    if path.name.endswith(".tmp"):
                        path.unlink(missing_ok=True)  # left by a crash mid-write
                elif path.stem not in wanted:
                    path.unlink(missing_ok=True)
