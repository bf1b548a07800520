"""OIP CUDA shared memory through tritonclient's own ``utils.cuda_shared_memory`` flow: a
model on cuda:0 reads its input from, and writes its output to, regions this process
allocated and registered by IPC handle; bad handles, devices and sizes are refused with
INVALID_ARGUMENT and leave the daemon serving.

Skipped without a CUDA device, tritonclient or cuda-bindings (which tritonclient's CUDA
helpers need); the GPU recipe (bench/gpu_recipe.sh) carries them.
"""

from __future__ import annotations

import base64

import grpc
import numpy as np
import pytest
import torch
import triton_helpers  # noqa: F401  (first: skips this module where tritonclient cannot load)

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
try:  # it raises RuntimeError, not ImportError, without cuda-python
    import tritonclient.utils.cuda_shared_memory as cudashm
except (ImportError, RuntimeError) as exc:
    pytest.skip(f"tritonclient's CUDA shared memory: {exc}", allow_module_level=True)
import model_zoo  # noqa: E402
from server_harness import start_daemon  # noqa: E402
from torch.export import Dim  # noqa: E402
from triton_helpers import client_fixtures, code_of  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402

from aotiserve.server.packaging import pack  # noqa: E402


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    repo = tmp_path_factory.mktemp("cuda-shm-repo")
    spec = model_zoo.MODELS["mlp"]
    inputs = tuple(t.cuda() for t in spec.inputs(4))
    pack(
        spec.module().cuda(),
        inputs,
        repo / "mlp.pt2",
        dynamic_shapes=({0: Dim("batch", min=1, max=spec.max_batch)},),
        **spec.pack_kwargs,
    )
    d = start_daemon([], ["--devices", "cuda:0"], repo=repo)
    yield d.target
    d.proc.terminate()
    d.proc.wait(30)


client, stub = client_fixtures()


def _region(name: str, nbytes: int):
    return cudashm.create_shared_memory_region(name, nbytes, 0)


def test_input_and_output_in_cuda_shared_memory(client):
    (x,) = model_zoo.MODELS["mlp"].inputs(6, seed=2)
    arr = x.numpy()
    out_bytes = 6 * 10 * 4
    cin, cout = _region("cin", arr.nbytes), _region("cout", out_bytes)
    try:
        cudashm.set_shared_memory_region(cin, [arr])
        client.register_cuda_shared_memory("cin", cudashm.get_raw_handle(cin), 0, arr.nbytes)
        client.register_cuda_shared_memory("cout", cudashm.get_raw_handle(cout), 0, out_bytes)
        status = client.get_cuda_shared_memory_status(as_json=True)
        assert {r["name"] for r in status["regions"].values()} == {"cin", "cout"}
        for _ in range(3):  # the regions serve request after request
            inp = tritonclient_grpc.InferInput("x", list(arr.shape), "FP32")
            inp.set_shared_memory("cin", arr.nbytes)
            out = tritonclient_grpc.InferRequestedOutput("output__0")
            out.set_shared_memory("cout", out_bytes)
            result = client.infer("mlp", [inp], outputs=[out])
            shape = list(result.get_output("output__0").shape)
            got = torch.from_numpy(cudashm.get_contents_as_numpy(cout, np.float32, shape))
            torch.testing.assert_close(got, model_zoo.eager("mlp", [x])[0], rtol=1e-4, atol=1e-4)
    finally:
        client.unregister_cuda_shared_memory()
        cudashm.destroy_shared_memory_region(cin)
        cudashm.destroy_shared_memory_region(cout)


def test_bad_cuda_regions_are_invalid_argument(client, stub):
    region = _region("bad", 4096)
    handle = cudashm.get_raw_handle(region)

    def register(**kw):
        with pytest.raises(grpc.RpcError) as e:
            stub.CudaSharedMemoryRegister(service_pb2.CudaSharedMemoryRegisterRequest(**kw))
        return code_of(e), e.value.details()

    try:
        raw = base64.b64decode(handle)
        assert register(name="z", raw_handle=b"\1" * 64, device_id=0, byte_size=64)[0] == (
            "INVALID_ARGUMENT"
        )
        assert register(name="s", raw_handle=b"short", device_id=0, byte_size=64)[0] == (
            "INVALID_ARGUMENT"
        )
        code, details = register(name="d", raw_handle=raw, device_id=99, byte_size=64)
        assert code == "INVALID_ARGUMENT" and "device_id" in details
        code, details = register(name="big", raw_handle=raw, device_id=0, byte_size=1 << 30)
        assert code == "INVALID_ARGUMENT" and "larger than the shared allocation" in details
        assert not client.get_cuda_shared_memory_status(as_json=True).get("regions")
        # ...and the model still serves.
        (x,) = model_zoo.MODELS["mlp"].inputs(2)
        inp = tritonclient_grpc.InferInput("x", [2, 64], "FP32")
        inp.set_data_from_numpy(x.numpy())
        got = torch.from_numpy(client.infer("mlp", [inp]).as_numpy("output__0"))
        torch.testing.assert_close(got, model_zoo.eager("mlp", [x])[0], rtol=1e-4, atol=1e-4)
    finally:
        cudashm.destroy_shared_memory_region(region)
