"""Open Inference Protocol messages and a client stub that stay out of protobuf's default pool.

``from oip_stub import ipb, GRPCInferenceServiceStub`` is a drop-in for
``aotiserve.oip.inference_pb2`` / ``inference_pb2_grpc`` in tests: the
classes come from the server's private descriptor pool
(``aotiserve.server.oip_codec.messages()``), so tritonclient can be
imported in the same process (see test_oip_isolated.py for why that matters).
"""

from __future__ import annotations

import grpc

from aotiserve.server.oip_codec import SERVICE_NAME, messages

ipb = messages()


class GRPCInferenceServiceStub:
    """One attribute per RPC, like the generated stub."""

    def __init__(self, channel: grpc.Channel):
        for method in ipb.service.methods:
            make = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(method.client_streaming, method.server_streaming)]
            setattr(
                self,
                method.name,
                make(
                    f"/{SERVICE_NAME}/{method.name}",
                    request_serializer=getattr(ipb, method.input_type.name).SerializeToString,
                    response_deserializer=getattr(ipb, method.output_type.name).FromString,
                ),
            )
