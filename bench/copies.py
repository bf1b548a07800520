"""Counts payload copies on aotiserve's native Run path, step by step.

Replays what the server does with one large request, calling the server's own
Run codec (``aotiserve.server.run_wire``: the request deserializer and response
serializer registered for Run) and tensor decoding (``tensor_codec.decode``, as
``DataPlane.decode_inputs`` calls it), and reads this process's memory around
each step: a step whose peak grows by the payload size made a full copy. Run in
a fresh subprocess (``python -m bench.copies``) so earlier allocations don't
hide growth. grpcio's own two copies (its receive buffer into a Python
``bytes``, and the serialized ``bytes`` into its send slice) are outside this
replay and the same for any grpcio server; the echo row of the large-tensor
table shows their cost.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from bench.procs import reset_peak_memory

MIB = 1 << 20


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def probe(rows: int = 16384, cols: int = 1024) -> dict:
    import torch

    from aotiserve.server import run_wire
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
        hwm = reset_peak_memory(os.getpid())
        before = _status_mib("VmRSS")
        t0 = time.perf_counter()
        value = fn()
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        keep.append(value)
        after = _status_mib("VmRSS")
        peak = (_status_mib("VmHWM") if hwm else after) - before
        steps.append({"step": name, "where": where, "peak_growth_mib": round(peak, 1),
                      "kept_mib": round(after - before, 1), "copies": round(peak * MIB / nbytes),
                      "ms": round(elapsed_ms, 1)})
        return value

    request = step("parse_run_request (grpcio calls it as Run's deserializer)",
                   "server/run_wire.py", lambda: run_wire.parse_run_request(wire))
    tensor = step("decode (a numpy view of the request bytes)", "server/tensor_codec.py decode",
                  lambda: codec.decode(request.inputs[0], "input 0"))
    output = step("model output (x*w+b)", "the model (a result, not a copy)",
                  lambda: (tensor * 1.0).contiguous())
    response = step("write_run_response (grpcio sends the bytes it returns)", "server/run_wire.py",
                    lambda: run_wire.write_run_response([output], [pb.DATA_TYPE_FLOAT32], "initial"))
    check = pb.RunResponse.FromString(response)  # the generated parser reads it back
    ok = (list(check.outputs[0].shape) == [rows, cols] and len(check.outputs[0].data) == nbytes
          and check.weights_version == "initial"
          and torch.equal(torch.frombuffer(bytearray(check.outputs[0].data), dtype=torch.float32),
                          output.reshape(-1)))
    server_copies = sum(s["copies"] for s in steps if not s["where"].startswith("the model"))
    return {"payload_mib": nbytes / MIB, "steps": steps, "server_copies": server_copies,
            "roundtrip_ok": ok, "grpcio_copies": 2, "hwm_reset": reset_peak_memory(os.getpid()),
            "torch": torch.__version__}


def main() -> None:
    print(json.dumps(probe(*(int(a) for a in sys.argv[1:3]))))


if __name__ == "__main__":
    main()
