"""Who is calling: gRPC peer strings (``context.peer()``) read as addresses, and which of
them still have an open connection to the daemon (Linux: ``/proc/net/tcp`` and ``tcp6``).

Peers look like ``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000`` (gRPC C++ may percent-encode
the brackets: ``ipv6:%5B::1%5D:5000``) or ``unix:/path``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import unquote

from aotiserve.client.channel import is_loopback_host

Address = tuple[str, int]  # (canonical IP text, port)

# /proc/net/tcp's state column: the connection is up.
_ESTABLISHED = "01"


def address(peer: str) -> Address | None:
    """A TCP peer's (ip, port), IPv4-mapped IPv6 as IPv4; None for unix sockets and
    anything else that is not an IP address."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6") or not rest:
        return None
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        number = int(port)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), number


def is_local(peer: str) -> bool:
    """Whether the peer is on this host: a unix socket or a loopback address."""
    if unquote(peer).startswith("unix:"):
        return True
    a = address(peer)
    return a is not None and is_loopback_host(a[0])


def _sockets(root: str) -> list[list[str]] | None:
    """The established TCP sockets of this network namespace, as /proc/net/tcp{,6} columns
    (1: local address, 2: remote, 7: owner's uid); None where /proc cannot tell."""
    rows: list[list[str]] = []
    read_any = False
    for name in ("tcp", "tcp6"):
        try:
            lines = (Path(root) / name).read_text().splitlines()[1:]
        except OSError:
            continue
        read_any = True
        rows += [c for c in (line.split() for line in lines) if len(c) > 3 and c[3] == _ESTABLISHED]
    return rows if read_any else None


def established(root: str = "/proc/net") -> set[Address] | None:
    """The remote ends of every established TCP connection of this network namespace
    (the daemon's accepted connections among them); None where /proc cannot tell."""
    rows = _sockets(root)
    if rows is None:
        return None
    return {a for a in (_proc_address(c[2]) for c in rows) if a is not None}


def peer_uid(peer: str, root: str = "/proc/net") -> int | None:
    """The user owning a TCP peer's socket, where that socket is in this network namespace
    (a client on this host, not in another container); None where it cannot be told."""
    want = address(peer)
    if want is None:
        return None
    for c in _sockets(root) or ():
        if len(c) > 7 and _proc_address(c[1]) == want:
            try:
                return int(c[7])
            except ValueError:
                return None
    return None


def _proc_address(text: str) -> Address | None:
    """``/proc/net/tcp``'s ``0100007F:1F90`` (each 32-bit word in host byte order)."""
    hex_ip, _, hex_port = text.partition(":")
    try:
        raw = bytes.fromhex(hex_ip)
        port = int(hex_port, 16)
    except ValueError:
        return None
    if len(raw) not in (4, 16):
        return None
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port
