"""A quic:// URL's options, turned into aioquic configurations.

Server: ``cert=FILE`` (PEM, the chain; may hold the key too) and ``key=FILE``; without ``cert`` the server makes an
ephemeral self-signed certificate when it starts. Client: ``ca=FILE`` (trust anchors: the server's certificate is
then verified, against ``servername=`` or the URL host); without ``ca`` the client does not verify the server, and
who may use the tunnel is decided by vtunnel's pre-shared key (or ``--insecure``), as on kcp://. Both:
``idle=SECONDS`` (the QUIC idle timeout; keep-alive PINGs go out at a third of it), ``cc=reno|cubic`` (congestion
control) and ``mtu=BYTES`` (the largest UDP payload sent, 1200 to 1452). Server: ``retry=1`` validates a client's
address with a Retry packet before keeping any state for it (:mod:`vtunnel_quic.stateless`). ALPN is ``vtunnel``.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID

from vtunnel.transports.base import Endpoint, TransportError

__all__ = [
    "ALPN",
    "CONNECTION_WINDOW",
    "OPTIONS",
    "STREAM_WINDOW",
    "QuicOptions",
    "client_configuration",
    "parse_options",
    "self_signed_certificate",
    "server_configuration",
]

ALPN = "vtunnel"
OPTIONS = frozenset({"cert", "key", "ca", "servername", "idle", "cc", "mtu", "retry"})
#: bytes the peer may send on the tunnel's stream beyond what the application has read (the receive buffer bound)
STREAM_WINDOW = 4 * 1024 * 1024
#: the same for the whole connection (the tunnel's stream and whatever else a peer opens, which is dropped)
CONNECTION_WINDOW = 2 * STREAM_WINDOW
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


@dataclass(frozen=True, slots=True)
class QuicOptions:
    idle: float = 30.0
    cc: str = "reno"
    mtu: int = 1350
    retry: bool = False


def parse_options(endpoint: Endpoint) -> QuicOptions:
    """Check a quic:// URL's options; :class:`TransportError` names the bad one."""
    params = endpoint.params
    unknown = set(params) - OPTIONS
    if unknown:
        raise TransportError(f"unknown quic:// option(s): {', '.join(sorted(unknown))}")
    if "key" in params and "cert" not in params:
        raise TransportError("quic:// key= needs cert= too")
    try:
        idle = float(params.get("idle", "30"))
        mtu = int(params.get("mtu", "1350"))
    except ValueError as exc:
        raise TransportError(f"bad quic:// option value: {exc}") from None
    if not 1.0 <= idle <= 3600.0:
        raise TransportError(f"quic:// idle= must be between 1 and 3600 seconds, got {idle:g}")
    if not 1200 <= mtu <= 1452:
        raise TransportError(f"quic:// mtu= must be between 1200 and 1452, got {mtu}")
    cc = params.get("cc", "reno")
    if cc not in ("reno", "cubic"):
        raise TransportError(f"quic:// cc= must be reno or cubic, got {cc!r}")
    retry = params.get("retry", "0")
    if retry not in ("0", "1"):
        raise TransportError(f"quic:// retry= must be 0 or 1, got {retry!r}")
    return QuicOptions(idle=idle, cc=cc, mtu=mtu, retry=retry == "1")


def _base(endpoint: Endpoint, *, is_client: bool) -> QuicConfiguration:
    options = parse_options(endpoint)
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        idle_timeout=options.idle,
        congestion_control_algorithm=options.cc,
        max_datagram_size=options.mtu,
        max_data=CONNECTION_WINDOW,
        max_stream_data=STREAM_WINDOW,
    )


def client_configuration(endpoint: Endpoint) -> QuicConfiguration:
    """The client's: the server verified against ``ca=`` when given, else not verified (the key decides)."""
    config = _base(endpoint, is_client=True)
    servername = endpoint.params.get("servername")
    config.server_name = servername or endpoint.host
    if "ca" in endpoint.params:
        try:
            config.load_verify_locations(cafile=endpoint.params["ca"])
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise TransportError(f"quic:// ca= could not be read: {exc}") from None
        config.verify_mode = ssl.CERT_REQUIRED
    else:
        config.verify_mode = ssl.CERT_NONE
        if servername is None and _is_ip(endpoint.host):
            config.server_name = None  # no SNI for an address
    return config


def server_configuration(endpoint: Endpoint) -> QuicConfiguration:
    """The server's: the certificate of ``cert=`` / ``key=``, or an ephemeral self-signed one."""
    config = _base(endpoint, is_client=False)
    if "cert" in endpoint.params:
        chain, key = _load_pem(Path(endpoint.params["cert"]), endpoint.params.get("key"))
        config.certificate, config.certificate_chain, config.private_key = chain[0], chain[1:], key
    else:
        config.certificate, config.private_key = self_signed_certificate(endpoint.host)
    return config


def _load_pem(
    cert_file: Path, key_file: str | None
) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey]:
    """The certificates of ``cert_file`` (first the server's) and the private key of ``key_file`` (or, without
    one, of ``cert_file``), whatever the order of the PEM blocks."""
    try:
        cert_pem = cert_file.read_bytes()
        key_pem = Path(key_file).read_bytes() if key_file else cert_pem
        chain = [
            x509.load_pem_x509_certificate(block.group(0))
            for block in _PEM_BLOCK.finditer(cert_pem)
            if block.group(1) == b"CERTIFICATE"
        ]
        keys = [
            block.group(0)
            for block in _PEM_BLOCK.finditer(key_pem)
            if block.group(1).endswith(b"PRIVATE KEY")
        ]
        if not chain:
            raise ValueError(f"no certificate in {cert_file}")
        if not keys:
            raise ValueError(f"no private key in {key_file or cert_file}")
        key = load_pem_private_key(keys[0], password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise TransportError(f"quic:// server certificate set-up failed: {exc}") from None
    return chain, key  # type: ignore[return-value]  # any key type aioquic signs with


def self_signed_certificate(host: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh P-256 key and a certificate for it, signed by itself, valid from a day ago for a year."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vtunnel")])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName("vtunnel")]
    if _is_ip(host):
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
