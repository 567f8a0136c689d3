"""TLS verification is on: a server whose certificate is not trusted is never sent the effect."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Iterator

import pytest
from errands.connectors.http import HttpConnector
from errands.core import DispatchOutcome, Effect


def _write_ca_and_leaf(folder: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "errands test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem, cert_pem, key_pem = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return ca_pem, cert_pem, key_pem


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:
        return None

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).received.append(self.headers.get("Idempotency-Key") or "")
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    pytest.importorskip("cryptography")
    ca, cert, key = _write_ca_and_leaf(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    received: ClassVar[list[str]] = []
    handler = type("Handler", (_Handler,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/pay", ca, received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_untrusted_certificate_is_refused_before_sending(tls_server: tuple[str, Path, list[str]]) -> None:
    url, _ca, received = tls_server
    with HttpConnector(url=url, connect_retries=0) as connector:
        result = connector.dispatch(Effect(key="tls-1", connector="bank", payload={}))
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert "CERTIFICATE_VERIFY_FAILED" in (result.error or "") or "certificate" in (result.error or "").lower()
    assert "was not sent" in (result.error or "")
    assert received == []


def test_ca_bundle_trusts_a_private_ca(tls_server: tuple[str, Path, list[str]]) -> None:
    url, ca, received = tls_server
    with HttpConnector(url=url, ca_bundle=str(ca)) as connector:
        result = connector.dispatch(Effect(key="tls-2", connector="bank", payload={}))
    assert result.outcome is DispatchOutcome.CONFIRMED, result.error
    assert received == ["tls-2"]
