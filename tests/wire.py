"""Small wire helpers for server tests (raw generated stubs, torch tensors)."""

from __future__ import annotations

import torch

from aotiserve.server import runner_codec
from aotiserve.server import tensor_codec as codec
from aotiserve.v1 import model_runner_pb2 as pb


def run_request(model: str, inputs) -> pb.RunRequest:
    return pb.RunRequest(model=model, inputs=[runner_codec.encode(t) for t in inputs])


def outputs(resp: pb.RunResponse) -> list[torch.Tensor]:
    return [codec.decode(t, f"output {i}").clone() for i, t in enumerate(resp.outputs)]


def close(a, b) -> bool:
    return all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(a, b)) and len(a) == len(
        b
    )


def extract(stub, model: str, use_inactive: bool = False, chunk_bytes: int = 0) -> dict:
    """Reassembles ExtractConstantsMap into {name: tensor}."""
    parts: dict[str, tuple] = {}
    for c in stub.ExtractConstantsMap(
        pb.ExtractConstantsMapRequest(
            model=model, use_inactive=use_inactive, chunk_bytes=chunk_bytes
        )
    ):
        dtype = codec.TORCH_DTYPE_BY_WIRE[c.dtype]
        entry = parts.setdefault(c.name, (dtype, tuple(c.shape), bytearray()))
        assert c.offset == len(entry[2])
        entry[2].extend(c.data)
    out = {}
    for name, (dtype, shape, buf) in parts.items():
        out[name] = (
            torch.frombuffer(bytes(buf), dtype=dtype).reshape(shape).clone()
            if buf
            else torch.empty(shape, dtype=dtype)
        )
    return out


def upload_requests(
    model: str,
    tensors: dict,
    *,
    use_inactive: bool = True,
    validate_full: bool = False,
    chunk_bytes: int = 1 << 20,
    description: str = "",
    header_specs=None,
    order=None,
):
    """Yields an UpdateConstantBuffer stream for {name: tensor}."""
    specs = (
        header_specs
        if header_specs is not None
        else [
            pb.TensorSpec(name=n, dtype=codec.wire_dtype(t.dtype), shape=list(t.shape))
            for n, t in tensors.items()
        ]
    )
    yield pb.UpdateConstantBufferRequest(
        header=pb.UpdateConstantBufferHeader(
            model=model,
            use_inactive=use_inactive,
            validate_full_updates=validate_full,
            constants=specs,
            description=description,
        )
    )
    chunks = []
    for name, t in tensors.items():
        data = codec.tensor_bytes(t)
        for off in range(0, max(len(data), 1), chunk_bytes):
            chunks.append(
                pb.ConstantChunk(name=name, offset=off, data=data[off : off + chunk_bytes])
            )
    if order is not None:
        chunks = order(chunks)
    for c in chunks:
        yield pb.UpdateConstantBufferRequest(chunk=c)


def pause_at_half(messages, reached, release, *, end: bool = False):
    """Yields ``messages``; halfway it sets ``reached`` and waits (up to 30 s) for
    ``release``, then goes on, or ends the stream there when ``end``."""
    messages = list(messages)
    for i, m in enumerate(messages):
        if i == len(messages) // 2:
            reached.set()
            release.wait(30)
            if end:
                return
        yield m
