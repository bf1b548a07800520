"""Shared fixtures: compiled model packages, cached across runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_zoo  # noqa: E402

TEST_MODELS = ("mlp", "conv", "two_io", "blob_mlp")


@pytest.fixture(scope="session")
def model_package():
    """model_package(name) -> Path of the compiled .pt2 (compiled once, cached on disk)."""
    return model_zoo.compiled


@pytest.fixture(scope="session")
def zoo():
    return model_zoo


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
