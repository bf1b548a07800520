"""Prints the wire schema of the ``inference`` proto package as JSON.

``python tests/oip_wire_schema.py ours|tritonclient``: the tests run it twice,
each in its own process (our generated ``inference.*`` messages and
tritonclient's cannot share one descriptor pool), and compare the output:
service methods plus every message's field names, numbers, types and labels.
tritonclient's model_config.proto types come under ``config_types``: ours
defines a subset of them (the fields aotiserve fills in).
"""

from __future__ import annotations

import json
import sys


def _message(md) -> dict:
    fields = {}
    for f in md.fields:
        kind = (
            f.message_type.full_name
            if f.message_type
            else (f.enum_type.full_name if f.enum_type else f.type)
        )
        fields[f.name] = [f.number, kind, f.is_repeated]
    out = {md.full_name: fields}
    for nested in md.nested_types:
        out.update(_message(nested))
    for enum in md.enum_types:
        out[enum.full_name] = {v.name: v.number for v in enum.values}
    return out


def schema(which: str) -> dict:
    if which == "ours":
        from aotiserve.oip import inference_pb2 as pb

        files = [pb.DESCRIPTOR]
    else:
        from tritonclient.grpc import model_config_pb2, service_pb2

        files = [service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR]
    out: dict = {"methods": {}, "types": {}, "config_types": {}}
    for fd in files:
        types = out["config_types"] if fd.name == "model_config.proto" else out["types"]
        for svc in fd.services_by_name.values():
            for m in svc.methods:
                out["methods"][f"{svc.full_name}/{m.name}"] = [
                    m.input_type.full_name,
                    m.output_type.full_name,
                    m.client_streaming,
                    m.server_streaming,
                ]
        for md in fd.message_types_by_name.values():
            types.update(_message(md))
        for enum in fd.enum_types_by_name.values():
            types[enum.full_name] = {v.name: v.number for v in enum.values}
    return out


if __name__ == "__main__":
    json.dump(schema(sys.argv[1]), sys.stdout, sort_keys=True)
