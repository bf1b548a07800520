"""A throwaway PKI for the TLS tests, made by the openssl command line: a CA with a server
certificate (localhost, 127.0.0.1) and a client one, and on request a rogue CA with its own."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HAVE_OPENSSL = shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(ext + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


def make(d: Path, rogue: bool = False) -> Path:
    """``d`` with ca.pem/.key, server.pem/.key and client.pem/.key (and with ``rogue``,
    rogue_ca, rogue_server and rogue_client from another CA); returns ``d``."""
    san = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    for ca in ("ca", "rogue_ca") if rogue else ("ca",):
        _ca(d, ca)
        prefix = "" if ca == "ca" else "rogue_"
        _leaf(d, f"{prefix}server", ca, san)
        _leaf(d, f"{prefix}client", ca, "extendedKeyUsage=clientAuth")
    return d
