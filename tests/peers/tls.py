"""TLS for the HTTPS test peers (KBS, Alibaba KMS, kube-apiserver): certs and serving.

Why one place: every peer needs a throwaway CA and a server certificate for 127.0.0.1 that
strict verifiers accept (CA key usage, SKI/AKI, serverAuth), and the same dance to serve a
ThreadingHTTPServer over TLS from a daemon thread. Tests trust the returned CA file only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading
from http.server import ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def make_server_tls(
    directory: str,
    *,
    ca_cn: str,
    ca_file: str = "ca.pem",
    cert_file: str = "server.pem",
    key_file: str = "server.key",
    key_ids: bool = True,
) -> tuple[str, str, str]:
    """A fresh CA and a server cert for 127.0.0.1/localhost; returns (ca, cert, key) paths.

    ``key_ids=False`` leaves out the subject/authority key identifiers, so a verifier finds
    the issuer by name alone: two such CAs with one name collide, as the Alibaba KMS test
    of an impostor endpoint relies on.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_cn)])
    ca_builder = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    )
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if key_ids:
        ca_builder = ca_builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False
        )
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    ca_cert = ca_builder.sign(ca_key, hashes.SHA256())
    cert = builder.sign(ca_key, hashes.SHA256())
    paths = tuple(os.path.join(directory, n) for n in (ca_file, cert_file, key_file))
    with open(paths[0], "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths[0], paths[1], paths[2]


class ServedHttp:
    """Serve ``httpd`` (bound to 127.0.0.1:0) from a daemon thread, over TLS if asked.

    ``lazy_handshake`` moves the TLS handshake into the handler thread, so a stalled client
    cannot block accept() for everyone else.
    """

    def __init__(
        self,
        httpd: ThreadingHTTPServer,
        tls: tuple[str, str] | None = None,
        *,
        lazy_handshake: bool = False,
        poll_interval: float = 0.5,
    ) -> None:
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            httpd.socket = ctx.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=not lazy_handshake
            )
        self.httpd = httpd
        self.port: int = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
