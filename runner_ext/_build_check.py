"""Refuses to load the extension against a torch other than the one it was built with."""

from __future__ import annotations

import torch

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e . (or `make setup`)"


def check_torch_matches_build() -> None:
    try:
        from ._build_info import TORCH_VERSION
    except ImportError as exc:  # the extension was never built
        raise ImportError(f"aotiserve.runner_ext is not built; {REBUILD_HINT}") from exc
    if torch.__version__ != TORCH_VERSION:
        raise ImportError(
            f"aotiserve.runner_ext was built against torch {TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; {REBUILD_HINT}"
        )
