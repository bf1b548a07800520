"""The built-in demo model: a tiny MLP compiled on first start, cached by torch version.

``aotiserve serve`` with no model repository serves it as ``demo`` so a
newcomer sees a working daemon at once.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"


class DemoMLP(torch.nn.Module):
    """[batch, 8] float32 -> [batch, 3] float32."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def demo_module() -> DemoMLP:
    torch.manual_seed(0)
    return DemoMLP().eval()


def ensure_demo_package(cache_dir: str | os.PathLike) -> Path:
    """Path of the compiled demo package, compiling it (about a minute) on a cache miss."""
    path = Path(cache_dir) / f"torch-{torch.__version__}" / "demo.pt2"
    if path.exists():
        log.info("demo model: using cached package %s", path)
        return path
    from torch.export import Dim

    from .packaging import pack

    path.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "demo model: compiling a tiny MLP with AOTInductor into %s "
        "(first start only; this takes a minute)...",
        path,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        pack(
            demo_module(),
            (torch.randn(2, 8),),
            tmp_path,
            dynamic_shapes=({0: Dim("batch", min=1, max=4096)},),
            input_names=("x",),
            output_names=("y",),
        )
        os.replace(tmp_path, path)
    log.info("demo model: compiled in %.1fs", time.monotonic() - started)
    return path
