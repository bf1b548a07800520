"""Helpers for tests that drive the daemon with tritonclient (test_oip*.py): zoo models'
inputs as tritonclient InferInputs, outputs checked against eager, status names.

Importing it skips the importing test module where this session already imported
``aotiserve.oip``, whose ``inference.*`` messages exclude tritonclient's from the process
(see test_oip.py's docstring; test_oip_isolated.py runs the OIP suites in a fresh
interpreter then). Import it before tritonclient."""

from __future__ import annotations

import sys

import pytest

if "aotiserve.oip.inference_pb2" in sys.modules:
    pytest.skip(
        "another test module of this session imported aotiserve.oip, which excludes "
        "tritonclient from this process; test_oip_isolated.py runs the OIP suites in a "
        "fresh interpreter instead",
        allow_module_level=True,
    )

import grpc  # noqa: E402
import model_zoo  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")


def client_fixtures():
    """Module-scoped ``client`` (tritonclient's) and ``stub`` (tritonclient's own generated
    stub, for requests its client cannot build) over the module's ``daemon`` fixture (the
    daemon's target). In a test module: ``client, stub = client_fixtures()``."""
    from tritonclient.grpc import service_pb2_grpc

    @pytest.fixture(scope="module")
    def client(daemon):
        c = tritonclient_grpc.InferenceServerClient(daemon)
        yield c
        c.close()

    @pytest.fixture(scope="module")
    def stub(daemon):
        channel = grpc.insecure_channel(daemon)
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
        channel.close()

    return client, stub


def io_specs(name: str) -> tuple[list[dict], list[dict]]:
    """What the model's package records: [{"name", "dtype", "shape"}] for inputs and outputs."""
    from aotiserve.runner_ext import read_package_metadata
    from aotiserve.server.packaging import read_io_specs

    specs = read_io_specs(read_package_metadata(model_zoo.compiled(name)))
    assert specs is not None
    return specs


OIP = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}


def triton_inputs(name: str, tensors) -> list:
    inputs = []
    for spec, t in zip(io_specs(name)[0], tensors):
        arr = t.numpy()
        inp = tritonclient_grpc.InferInput(spec["name"], list(arr.shape), OIP[spec["dtype"]])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def assert_matches_eager(name: str, tensors, outputs: dict[str, np.ndarray]) -> None:
    expected = model_zoo.eager(name, tensors)
    out_specs = io_specs(name)[1]
    assert set(outputs) == {s["name"] for s in out_specs}
    for spec, ref in zip(out_specs, expected):
        got = torch.from_numpy(np.array(outputs[spec["name"]]))
        assert got.dtype == ref.dtype, spec["name"]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=f"{name}:{spec['name']}")


def code_of(excinfo) -> str:
    """grpc status name of a tritonclient or grpc error."""
    err = excinfo.value
    if isinstance(err, grpc.RpcError):
        return err.code().name
    return str(err.status()).removeprefix("StatusCode.")
