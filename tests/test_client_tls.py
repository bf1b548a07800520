"""TLS and mutual TLS between the client (and CLI) and a real daemon, with a
throwaway CA made by the openssl command line."""

from __future__ import annotations

from pathlib import Path

import pki as pki_files
import pytest
from server_harness import running_server

import aotiserve.client as ac
from aotiserve.client import cli

pytestmark = pytest.mark.skipif(not pki_files.HAVE_OPENSSL, reason="needs the openssl command")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return pki_files.make(tmp_path_factory.mktemp("pki"))


def test_tls(pki, zoo):
    with running_server(
        ["mlp"], tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")
    ) as s:
        x = list(zoo.MODELS["mlp"].inputs(1))
        with ac.Client(s.target, ca_cert=pki / "ca.pem", timeout=10) as client:  # a path
            assert client.health() == "SERVING"
            assert client.model("mlp").run(x)[0].shape == (1, 10)
        pem = (pki / "ca.pem").read_bytes()
        with ac.Client(s.target, ca_cert=pem, timeout=10) as client:  # bytes
            assert client.model("mlp").get_call_spec()
        with ac.Client(s.target, timeout=5) as plaintext:
            with pytest.raises(ac.UnavailableError):
                plaintext.health()
        with ac.Client(s.target, tls=True, timeout=5) as untrusted:  # system roots: not our CA
            with pytest.raises(ac.UnavailableError):
                untrusted.health()


def test_refused_handshakes_cannot_flood_the_log(pki, caplog):
    """Any peer can fail a TLS handshake; gRPC logs each one. Its lines go through the
    port's log, each kind once and then at most once a minute."""
    with (
        running_server(
            ["mlp"], tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")
        ) as s,
        caplog.at_level("WARNING"),
    ):
        for _ in range(20):
            with ac.Client(s.target, timeout=5) as plaintext:
                with pytest.raises(ac.UnavailableError):
                    plaintext.health()
        s.app.port_server.flush_log()
        grpc_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("grpc: ")]
        assert 0 < len(grpc_lines) <= 5, grpc_lines


def test_mutual_tls_and_cli_flags(pki, capsys):
    with running_server(
        ["mlp"],
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_ca=str(pki / "ca.pem"),
    ) as s:
        with ac.Client(
            s.target,
            ca_cert=pki / "ca.pem",
            client_cert=pki / "client.pem",
            client_key=pki / "client.key",
            timeout=10,
        ) as client:
            assert client.health() == "SERVING"
        with ac.Client(s.target, ca_cert=pki / "ca.pem", timeout=5) as no_client_cert:
            with pytest.raises(ac.UnavailableError):
                no_client_cert.health()
        with pytest.raises(ValueError, match="both client_cert and client_key"):
            ac.Client(s.target, ca_cert=pki / "ca.pem", client_cert=pki / "client.pem")

        code = cli.main(
            [
                "models",
                "--target",
                s.target,
                "--tls-ca",
                str(pki / "ca.pem"),
                "--tls-cert",
                str(pki / "client.pem"),
                "--tls-key",
                str(pki / "client.key"),
            ]
        )
        assert code == 0 and "mlp" in capsys.readouterr().out
        # the certificate names localhost: connect by IP, check the name given
        host_port = "localhost:" + s.target.rsplit(":", 1)[1]
        code = cli.main(
            [
                "health",
                "--target",
                host_port,
                "--tls-ca",
                str(pki / "ca.pem"),
                "--tls-cert",
                str(pki / "client.pem"),
                "--tls-key",
                str(pki / "client.key"),
                "--tls-server-name",
                "localhost",
            ]
        )
        assert code == 0 and capsys.readouterr().out.strip() == "SERVING"
