"""Paths a client names (packages to load, weight blobs): below the server's roots, real files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import InvalidArgument, PermissionDenied


def resolve_below(path: str, what: str, roots: Sequence[str], kind: str, flag: str) -> Path:
    """``path`` with symlinks and .. resolved; it must lie below one of ``roots``
    (``kind`` and ``flag`` name them in the error)."""
    if not path:
        raise InvalidArgument(f"{what}: empty path")
    if "\0" in path:
        raise InvalidArgument(f"{what}: the path holds a NUL character")
    resolved = Path(os.path.realpath(path))
    for root in roots:
        root_real = Path(os.path.realpath(root))
        if resolved == root_real or root_real in resolved.parents:
            return resolved
    raise PermissionDenied(
        f"{what}: {path!r} is not below a {kind} of this server (configure {flag})"
    )


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. ENAMETOOLONG: not a file we can open either
        return False
