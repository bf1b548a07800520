"""Helpers shared by test modules (no test module imports another)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import grpc
import model_zoo
import pytest
import torch
import wire

from aotiserve.v1 import model_runner_pb2 as pb


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Waits on server state (no fixed sleep): checks every 10 ms up to ``timeout``."""
    tick = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        tick.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def code_of(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of the error ``fn()`` must raise."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def status_of(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """(OK, "") if ``fn()`` succeeds, else its error's code and details."""
    try:
        fn()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def new_weights(model: str, factor: float = 0.5, shift: float = 0.1) -> dict[str, torch.Tensor]:
    """Every floating-point weight of zoo ``model``, changed (``w * factor + shift``)."""
    sd = model_zoo.MODELS[model].module().state_dict()
    return {k: (v * factor + shift).contiguous() for k, v in sd.items() if v.is_floating_point()}


def eager_with(model: str, weights: dict[str, torch.Tensor], inputs) -> list[torch.Tensor]:
    """Zoo ``model`` run eagerly on ``inputs`` with ``weights`` loaded over its own."""
    module = model_zoo.MODELS[model].module()
    sd = module.state_dict()
    sd.update(weights)
    module.load_state_dict(sd)
    with torch.no_grad():
        out = module(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def upload(stub, model, tensors, **kw) -> pb.UpdateConstantBufferResponse:
    """``tensors`` ({name: tensor}) staged with one UpdateConstantBuffer stream."""
    return stub.UpdateConstantBuffer(wire.upload_requests(model, tensors, **kw))


def run(stub, model, inputs):
    """(outputs, weights version) of one Run."""
    resp = stub.Run(wire.run_request(model, inputs))
    return wire.outputs(resp), resp.weights_version


def info(stub, name) -> pb.ModelInfo:
    """Model ``name``'s entry of ListModels."""
    return next(m for m in stub.ListModels(pb.ListModelsRequest()).models if m.name == name)


def external_ip() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip
