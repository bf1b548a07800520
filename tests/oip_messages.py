"""The ``inference.*`` messages and a stub for tests that must not touch protobuf's default pool.

``aotiserve.oip.inference_pb2`` and tritonclient both register ``inference.*`` in
the process-wide default descriptor pool; pytest runs test_oip.py (tritonclient) in
the same process as other test files. So these tests use the server's private pool
(``oip_codec.messages()``, the same compiled descriptor) and a stub built on it.
"""

from __future__ import annotations

import grpc

from aotiserve.server.oip_codec import SERVICE_NAME, messages

ipb = messages()


class OipStub:
    """``inference.GRPCInferenceService`` methods as callables on a channel."""

    def __init__(self, channel: grpc.Channel):
        for m in ipb.service.methods:
            request = getattr(ipb, m.input_type.name)
            response = getattr(ipb, m.output_type.name)
            kind = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(m.client_streaming, m.server_streaming)]
            setattr(
                self,
                m.name,
                kind(
                    f"/{SERVICE_NAME}/{m.name}",
                    request_serializer=request.SerializeToString,
                    response_deserializer=response.FromString,
                ),
            )
