"""Counts payload copies on aotiserve's native Run path, step by step.

Replays what the server does with one large request, calling the server's own
codec (``aotiserve.server.tensor_codec``) and the generated messages, and
reads this process's VmRSS after each step: a step that grows RSS by the
payload size made a full copy. Run in a fresh subprocess (``python -m
bench.copies``) so earlier allocations don't hide growth. grpcio's own two
copies (its receive buffer into a Python ``bytes``, and the serialized
``bytes`` into its send slice) are outside this replay; the echo row of the
large-tensor table shows their cost.
"""

from __future__ import annotations

import gc
import json
import sys
import time

MIB = 1 << 20


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_hwm() -> bool:
    """Sets VmHWM back to VmRSS (Linux: clear_refs 5), so each step's peak shows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- a sketch
# What the server could do instead (a proposal measured here, not server code):
# parse RunRequest's wire bytes by hand and wrap each input's data where it lies
# in grpcio's received ``bytes`` (torch.frombuffer with an offset: no copy), and
# write RunResponse's wire bytes by hand with one b"".join over a view of each
# output (one copy). Registered with grpc.unary_unary_rpc_method_handler(run,
# request_deserializer=parse_run_request, response_serializer=write_run_response).


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _put_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def parse_run_request(buf: bytes):
    """(model, [(dtype, shape, offset, length)]) with offsets into ``buf`` (no copy)."""
    model, inputs, pos, end = "", [], 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt != 2:  # RunRequest has only length-delimited fields
            raise ValueError(f"unexpected wire type {wt}")
        n, pos = _varint(buf, pos)
        if field == 1:
            model = bytes(buf[pos:pos + n]).decode()
        elif field == 2:
            inputs.append(_parse_tensor(buf, pos, pos + n))
        pos += n
    return model, inputs


def _parse_tensor(buf, pos: int, end: int):
    dtype, shape, offset, length = 0, [], pos, 0
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
            if field == 1:
                dtype = v
            elif field == 2:
                shape.append(v)
        else:
            n, pos = _varint(buf, pos)
            if field == 2:  # packed shape
                stop = pos + n
                while pos < stop:
                    v, pos = _varint(buf, pos)
                    shape.append(v)
                continue
            if field == 3:
                offset, length = pos, n
            pos += n
    return dtype, shape, offset, length


def write_run_response(outputs, wire_dtypes, weights_version: str) -> bytes:
    """RunResponse wire bytes: one b"".join over a byte view of each (contiguous CPU) output."""
    parts = []
    for t, wire in zip(outputs, wire_dtypes):
        data = memoryview(t.reshape(-1).view(__import__("torch").uint8).numpy())
        shape = b"".join(_put_varint(d) for d in t.shape)
        head = b"\x08" + _put_varint(wire) + b"\x12" + _put_varint(len(shape)) + shape
        head += b"\x1a" + _put_varint(data.nbytes)
        parts += [b"\x0a" + _put_varint(len(head) + data.nbytes) + head, data]
    v = weights_version.encode()
    parts.append(b"\x12" + _put_varint(len(v)) + v)
    return b"".join(parts)


def probe(rows: int = 16384, cols: int = 1024) -> dict:
    import torch

    from aotiserve.server import tensor_codec as codec
    from aotiserve.v1 import model_runner_pb2 as pb

    nbytes = rows * cols * 4
    wire = pb.RunRequest(model="passthrough", inputs=[pb.Tensor(
        dtype=pb.DATA_TYPE_FLOAT32, shape=[rows, cols], data=b"\x01" * nbytes)]).SerializeToString()
    gc.collect()
    steps = []
    keep = []  # everything stays alive, as it does within one request

    def step(name: str, where: str, fn):
        # Peak growth counts transient buffers too (a copy made and freed in the step).
        _reset_hwm()
        before = _status_mib("VmRSS")
        t0 = time.perf_counter()
        value = fn()
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        keep.append(value)
        peak = _status_mib("VmHWM") - before
        kept = _status_mib("VmRSS") - before
        steps.append({"step": name, "where": where, "peak_growth_mib": round(peak, 1),
                      "kept_mib": round(kept, 1), "copies": round(peak * MIB / nbytes), "ms": round(elapsed_ms, 1)})
        return value

    request = step("RunRequest.FromString (grpcio calls the deserializer)", "protobuf (upb) parse",
                   lambda: pb.RunRequest.FromString(wire))
    tensor = step("decode: t.data + torch.frombuffer", "server/tensor_codec.py decode",
                  lambda: codec.decode(request.inputs[0], "input 0"))
    output = step("model output (x*w+b)", "the model (a result, not a copy)",
                  lambda: (tensor * 1.0).contiguous())
    wire_t = step("encode: tensor_bytes + pb.Tensor(data=...)", "server/tensor_codec.py encode",
                  lambda: codec.encode(output))
    response = step("pb.RunResponse(outputs=[...])", "server/native_servicer.py Run",
                    lambda: pb.RunResponse(outputs=[wire_t], weights_version="initial"))
    step("RunResponse.SerializeToString (grpcio calls the serializer)", "protobuf (upb) serialize",
         response.SerializeToString)
    keep.clear()
    del request, tensor, wire_t, response
    gc.collect()
    current = steps
    steps = []
    parsed = step("parse_run_request (hand-written, offsets into grpcio's bytes)", "proposal",
                  lambda: parse_run_request(wire))
    dtype, shape, offset, length = parsed[1][0]
    fast_in = step("torch.frombuffer(wire, offset=...)", "proposal",
                   lambda: torch.frombuffer(wire, dtype=torch.float32, count=length // 4, offset=offset).view(shape))
    fast_out = step("model output (x*w+b)", "the model (a result, not a copy)", lambda: (fast_in * 1.0).contiguous())
    fast_wire = step("write_run_response (one join)", "proposal",
                     lambda: write_run_response([fast_out], [pb.DATA_TYPE_FLOAT32], "initial"))
    check = pb.RunResponse.FromString(fast_wire)  # the generated parser reads it back
    ok = (list(check.outputs[0].shape) == [rows, cols] and len(check.outputs[0].data) == nbytes
          and check.weights_version == "initial")
    proposal, steps = steps, current

    def total(xs):
        return sum(s["copies"] for s in xs if not s["where"].startswith("the model"))

    return {"payload_mib": nbytes / MIB, "steps": steps, "server_copies": total(steps),
            "proposal_steps": proposal, "proposal_copies": total(proposal), "proposal_roundtrip_ok": ok,
            "grpcio_copies": 2, "hwm_reset": _reset_hwm(), "torch": torch.__version__}


def main() -> None:
    print(json.dumps(probe(*(int(a) for a in sys.argv[1:3]))))


if __name__ == "__main__":
    main()
