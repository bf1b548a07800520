"""Shared fixtures: compiled model packages (cached across runs), servers for a test."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_zoo  # noqa: E402
from server_harness import RunningServer, running_server  # noqa: E402

TEST_MODELS = ("mlp", "conv", "two_io", "blob_mlp")


@pytest.fixture(scope="session")
def model_package():
    """model_package(name) -> Path of the compiled .pt2 (compiled once, cached on disk)."""
    return model_zoo.compiled


@pytest.fixture(scope="session")
def zoo():
    return model_zoo


@pytest.fixture
def server_factory():
    """server_factory(models, **kw) -> RunningServer (server_harness.running_server); all
    are stopped at teardown."""
    stack = contextlib.ExitStack()

    def start(models: Sequence[str] = (), **kw) -> RunningServer:
        return stack.enter_context(running_server(models, **kw))

    with stack:
        yield start


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
