"""Channels, call stubs and call metadata, shared by the sync and async clients.

The stubs are built from the service descriptor rather than the generated
``ModelRunnerStub`` so that one serializer can take either a protobuf message
or bytes the codec already encoded (see ``tensor_codec``), and so the same
table serves ``grpc`` and ``grpc.aio`` channels.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import grpc

from aotiserve.client.tensor_codec import parse_run_response
from aotiserve.v1 import model_runner_pb2 as pb

#: Matches the server's default receive limit. Chunked uploads and downloads
#: never come near it; it bounds single Run requests and responses.
DEFAULT_MAX_MESSAGE_BYTES = (64 << 20) + (64 << 10)

#: Download chunk size asked of ExtractConstantsMap (the server's default too).
DEFAULT_DOWNLOAD_CHUNK_BYTES = 4 << 20

WEIGHTS_VERSION_TRAILER = "aotiserve-weights-version"

#: The RPCs that change what a daemon serves: the only ones the admin token goes with.
MUTATING_RPCS = frozenset(
    {
        "LoadModel",
        "UnloadModel",
        "UpdateConstantBuffer",
        "SwapConstantBuffer",
        "RollbackConstantBuffer",
        "FreeInactiveConstantBuffer",
        "UpdateConstantBufferFromBlob",
        "LoadWeights",
        "LoadWeightsFromCuda",
    }
)


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def model_runner_stubs(channel) -> SimpleNamespace:
    """One multicallable per ``aotiserve.v1.ModelRunner`` RPC, by RPC name (``Run``'s
    response read without copying its outputs: ``tensor_codec.parse_run_response``)."""
    service = pb.DESCRIPTOR.services_by_name["ModelRunner"]
    stubs = SimpleNamespace()
    for method in service.methods:
        factory = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        setattr(
            stubs,
            method.name,
            factory(
                f"/{service.full_name}/{method.name}",
                request_serializer=_serialize,
                response_deserializer=(
                    parse_run_response
                    if method.name == "Run"
                    else getattr(pb, method.output_type.name).FromString
                ),
                _registered_method=True,
            ),
        )
    return stubs


def is_loopback_target(target: str) -> bool:
    """Whether a gRPC target names this machine: a loopback address, ``localhost``, or
    a Unix socket. Any other name counts as remote (DNS may say anything)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("//"):  # dns://authority/host:port
        target = target[2:].split("/", 1)[-1]
    hosts = [h.strip() for h in target.split(",")] if "," in target else [target]
    return bool(hosts) and all(is_loopback_host(_host_of(h)) for h in hosts)


def _host_of(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1 : hostport.find("]")] if "]" in hostport else hostport[1:]
    if hostport.count(":") == 1:
        return hostport.split(":", 1)[0]
    return hostport  # no port, or a bare IPv6 address


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv4-mapped included) is this machine."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _pem(value: bytes | str | os.PathLike | None, what: str) -> bytes | None:
    """PEM bytes from bytes, PEM text, or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {what} {str(value)!r}: {e.strerror}") from None


@dataclass(frozen=True)
class ChannelConfig:
    """Everything that shapes a client's channel and its calls."""

    target: str
    admin_token: str | None = None
    token: str | None = None
    tls: bool | None = None
    ca_cert: bytes | str | os.PathLike | None = None
    client_cert: bytes | str | os.PathLike | None = None
    client_key: bytes | str | os.PathLike | None = None
    tls_server_name: str | None = None
    credentials: grpc.ChannelCredentials | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    options: Sequence[tuple[str, Any]] = ()
    insecure: bool = False

    def __post_init__(self) -> None:
        if (
            (self.admin_token or self.token)
            and not self.use_tls()
            and not self.insecure
            and not is_loopback_target(self.target)
        ):
            raise ValueError(
                f"refusing to send a token in plaintext to {self.target!r}, which is not a "
                "loopback address: use TLS (ca_cert=... or tls=True), or pass insecure=True "
                "(CLI: --insecure) on a network you trust"
            )

    def use_tls(self) -> bool:
        if self.tls is not None:
            return self.tls
        return any(
            x is not None
            for x in (self.ca_cert, self.client_cert, self.client_key, self.credentials)
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if self.credentials is not None:
            return self.credentials
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both client_cert and client_key")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca_cert, "CA certificate"),
            private_key=_pem(self.client_key, "client key"),
            certificate_chain=_pem(self.client_cert, "client certificate"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        if self.tls_server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return opts + list(self.options)

    def fit_chunk(self, chunk_bytes: int) -> int:
        """``chunk_bytes``, shrunk so one chunk message fits the message-size limit
        (leaving room for the name, offset and framing)."""
        room = self.max_message_bytes - min(64 << 10, self.max_message_bytes // 2)
        return max(1, min(chunk_bytes, room))

    def metadata(self, mutating: bool = False) -> tuple[tuple[str, str], ...]:
        """Call metadata of one call: the bearer token, when there is one.

        The admin token goes only with mutating calls (:data:`MUTATING_RPCS`); every
        other call carries the inference token, if any (health needs none).
        """
        bearer = (self.admin_token or self.token) if mutating else self.token
        if not bearer:
            return ()
        return (("authorization", f"Bearer {bearer}"),)

    def metadata_of(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """RPC name → its call metadata (mutating RPCs get the admin token)."""
        plain, admin = self.metadata(), self.metadata(mutating=True)
        names = pb.DESCRIPTOR.services_by_name["ModelRunner"].methods_by_name
        return {name: admin if name in MUTATING_RPCS else plain for name in names}

    def open(self, aio: bool = False):
        """A new ``grpc.Channel`` (or ``grpc.aio.Channel``)."""
        mod = grpc.aio if aio else grpc
        if self.use_tls():
            return mod.secure_channel(
                self.target, self.channel_credentials(), options=self.channel_options()
            )
        return mod.insecure_channel(self.target, options=self.channel_options())
