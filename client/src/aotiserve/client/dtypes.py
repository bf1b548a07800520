"""The one table of element types: wire enum, torch name, numpy name, OIP name.

Shared by the client (numpy / torch) and the server (torch), so both ends
agree on every dtype without importing torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from aotiserve.v1 import model_runner_pb2 as pb


@dataclass(frozen=True)
class DType:
    wire: int  # aotiserve.v1.DataType value
    torch_name: str  # attribute of the torch module, e.g. "float32"
    numpy_name: str | None  # numpy dtype name, None where numpy has none
    itemsize: int
    oip_name: str | None  # Open Inference Protocol datatype string
    scalar_type: int  # c10::ScalarType code, as get_constant_names_to_dtypes returns


DTYPES: tuple[DType, ...] = (
    DType(pb.DATA_TYPE_FLOAT32, "float32", "float32", 4, "FP32", 6),
    DType(pb.DATA_TYPE_FLOAT64, "float64", "float64", 8, "FP64", 7),
    DType(pb.DATA_TYPE_FLOAT16, "float16", "float16", 2, "FP16", 5),
    DType(pb.DATA_TYPE_BFLOAT16, "bfloat16", None, 2, "BF16", 15),
    DType(pb.DATA_TYPE_INT8, "int8", "int8", 1, "INT8", 1),
    DType(pb.DATA_TYPE_INT16, "int16", "int16", 2, "INT16", 2),
    DType(pb.DATA_TYPE_INT32, "int32", "int32", 4, "INT32", 3),
    DType(pb.DATA_TYPE_INT64, "int64", "int64", 8, "INT64", 4),
    DType(pb.DATA_TYPE_UINT8, "uint8", "uint8", 1, "UINT8", 0),
    DType(pb.DATA_TYPE_BOOL, "bool", "bool", 1, "BOOL", 11),
    DType(pb.DATA_TYPE_FLOAT8_E4M3FN, "float8_e4m3fn", None, 1, None, 24),
    DType(pb.DATA_TYPE_FLOAT8_E5M2, "float8_e5m2", None, 1, None, 23),
    DType(pb.DATA_TYPE_FLOAT8_E4M3FNUZ, "float8_e4m3fnuz", None, 1, None, 26),
    DType(pb.DATA_TYPE_FLOAT8_E5M2FNUZ, "float8_e5m2fnuz", None, 1, None, 25),
    DType(pb.DATA_TYPE_UINT16, "uint16", "uint16", 2, "UINT16", 27),
    DType(pb.DATA_TYPE_UINT32, "uint32", "uint32", 4, "UINT32", 28),
    DType(pb.DATA_TYPE_UINT64, "uint64", "uint64", 8, "UINT64", 29),
)

BY_WIRE = {d.wire: d for d in DTYPES}
BY_TORCH_NAME = {d.torch_name: d for d in DTYPES}
BY_NUMPY_NAME = {d.numpy_name: d for d in DTYPES if d.numpy_name}
BY_OIP_NAME = {d.oip_name: d for d in DTYPES if d.oip_name}
BY_SCALAR_TYPE = {d.scalar_type: d for d in DTYPES}


def wire_name(wire: int) -> str:
    """Readable name of a wire dtype value, for error messages."""
    d = BY_WIRE.get(wire)
    return d.torch_name if d else f"unknown dtype {wire}"
