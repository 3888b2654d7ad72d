"""The hive's own CA, for TLS termination at the egress proxy.

The CA (an EC P-256 key, 0600 in ``<state>/ca/``, owned by hive-core; nothing of the
state directory is bound into a cage) signs one leaf certificate per destination name,
made on first use and cached in memory. Its certificate (public) goes into every
agent's socket directory, which the cage sees read-only as ``/run/hive/``: ``hive-ca.pem``
alone (``NODE_EXTRA_CA_CERTS``) and ``ca-bundle.pem``, the host's bundle plus it
(``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``).
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_DAYS = 3650
LEAF_DAYS = 7  # a leaf is remade after half of it
SniCheck = Callable[[ssl.SSLObject, str, ssl.SSLContext], int | None]


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class HiveCA:
    def __init__(self, root: Path) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        self.root = root
        key_path, cert_path = root / "ca.key", root / "ca.pem"
        if key_path.exists() and cert_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            self.key = loaded
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        else:
            self.key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hyperhive egress CA")])
            self.cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(self.key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(_now() - datetime.timedelta(hours=1))
                .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        key_cert_sign=True,
                        crl_sign=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                    critical=False,
                )
                .sign(self.key, hashes.SHA256())
            )
            _write_private(
                key_path,
                self.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            _write_private(cert_path, self.cert.public_bytes(serialization.Encoding.PEM))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self._lock = threading.Lock()
        self._contexts: dict[str, tuple[ssl.SSLContext, datetime.datetime]] = {}

    def bundle(self) -> bytes:
        """The host's trusted roots plus this CA: what a cage trusts."""
        try:
            system = SYSTEM_BUNDLE.read_bytes()
        except OSError:
            system = b""
        return system.rstrip(b"\n") + b"\n" + self.pem if system else self.pem

    def server_context(self, host: str, sni_check: SniCheck) -> ssl.SSLContext:
        """A server context presenting a leaf for ``host`` (cached per name)."""
        with self._lock:
            cached = self._contexts.get(host)
            if cached is not None and cached[1] > _now():
                return cached[0]
            ctx = self._leaf_context(host)
            ctx.sni_callback = sni_check
            self._contexts[host] = (ctx, _now() + datetime.timedelta(days=LEAF_DAYS / 2))
            return ctx

    def _leaf_context(self, host: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])  # the proxy speaks HTTP/1.1 to the cage
        # load_cert_chain reads files only: a private temporary file, gone at once.
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".leaf-") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                + cert.public_bytes(serialization.Encoding.PEM)
            )
            f.flush()
            ctx.load_cert_chain(f.name)
        return ctx


def upstream_context(extra_ca: Path | None) -> ssl.SSLContext:
    """How the proxy checks the real server: the host's trust store (plus an operator's
    CA), its name verified."""
    ctx = ssl.create_default_context()
    if extra_ca is not None:
        ctx.load_verify_locations(cafile=str(extra_ca))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
