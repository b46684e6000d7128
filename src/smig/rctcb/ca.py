"""The region CA: who may speak to the RC-TCB, and as what.

The RC-TCB talks HTTP over mutual TLS. Every party (a host's agent, an operator, the RC-TCB
itself) holds a certificate signed by the region's CA, which names its :class:`Role` in the
subject's OU and its identity in the CN (an agent's CN is its host id). TLS proves the peer holds
a key the CA vouched for; :func:`identity_of` then reads who it is, for the API layer to decide
what it may do.

Layout of a CA directory (default ``$SMIG_HOME/rctcb/ca``)::

    ca.pem                      the CA certificate (public, 0644): give it to every party
    ca-key.pem                  the CA key (0600): never overwritten without ``force``
    issued/<name>/cert.pem      an identity issued here (unless written elsewhere with ``out``)
    issued/<name>/key.pem       its key (0600)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smig.errors import CertificateRejected, ConfigError
from smig.model import valid_vm_name
from smig.paths import smig_home
from smig.pki import KeyPair, _write, generate_ca, sign_leaf

log = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
_CN_MAX = 64  # X.509's upper bound for a CommonName


class Role(StrEnum):
    """What a certificate's holder is to the RC-TCB (the subject's OU carries the value)."""

    AGENT = "agent"  # a host's agent: submits reports, fetches its assignments
    OPERATOR = "operator"  # a person or tool: enrols hosts, acts on the region
    RCTCB = "rctcb"  # the RC-TCB service itself (the TLS server)


@dataclass(frozen=True)
class Identity:
    """Who a verified certificate speaks for."""

    role: Role
    name: str


@dataclass(frozen=True)
class IssuedFiles:
    """Where :func:`issue_identity` put a certificate, its key, and the CA that signed them."""

    cert: Path
    key: Path
    ca: Path


def default_ca_dir() -> Path:
    """Where the region CA lives unless told otherwise."""
    return smig_home() / "rctcb" / "ca"


def ca_common_name(region: str) -> str:
    return f"SMIG region CA {region}"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex: what a person compares when copying ca.pem around."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _check_name(name: str, what: str) -> None:
    # Names become directory names under issued/ and host ids in the IVT: keep them plain.
    if not valid_vm_name(name):
        raise ConfigError(
            f"bad {what} {name!r}: use 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
        )


def _check_days(days: int) -> None:
    if days < 1:
        raise ConfigError(f"validity must be at least 1 day, not {days}")


def init_ca(directory: Path, region: str, *, days: int = 3650, force: bool = False) -> Path:
    """Create the region CA in ``directory``; return the path of its public ``ca.pem``.

    Raises:
        ConfigError: a bad region or validity, or a CA key already there and ``force`` not given
            (replacing the key orphans every certificate it issued).
    """
    _check_name(region, "region")
    _check_days(days)
    key_path = directory / CA_KEY
    if key_path.exists() and not force:
        raise ConfigError(f"a region CA already exists in {directory}; refusing to replace its key without --force")
    ca = generate_ca(ca_common_name(region), days=days)
    # mode only applies to directories created now: an existing directory the user named stays as it is.
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(key_path, ca.key_pem(), 0o600)
    _write(directory / CA_CERT, ca.cert_pem(), 0o644)
    log.info("region CA for %s created in %s (%s)", region, directory, fingerprint(ca.cert))
    return directory / CA_CERT


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key kept in ``directory``.

    Raises:
        ConfigError: the files are missing, unreadable, malformed, or do not belong together.
    """
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.exists() or not key_path.exists():
        raise ConfigError(f"no region CA in {directory} (run 'smig ca init --region NAME' to create one)")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read the region CA in {directory}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _default_sans(role: Role, name: str, dns: Sequence[str], ips: Sequence[str]) -> tuple[list[str], list[str]]:
    # The server must be reachable by a checked hostname; with nothing named, cover this machine.
    if role is Role.RCTCB and not dns and not ips:
        return [name, "localhost"], ["127.0.0.1", "::1"]
    return list(dns), list(ips)


def issue_identity(
    directory: Path,
    name: str,
    role: Role,
    *,
    out: Path | None = None,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = 825,
) -> IssuedFiles:
    """Sign a new key for ``name`` acting as ``role``; write ``cert.pem`` and ``key.pem``.

    Files go to ``out`` or ``<directory>/issued/<name>``; issuing a name again replaces its files.
    An ``rctcb`` certificate is valid as TLS server and client and, when no ``dns``/``ips`` are
    given, covers ``name``, localhost, 127.0.0.1 and ::1; an agent's is server and client for the
    names given; operators are TLS clients.

    Raises:
        ConfigError: no CA in ``directory``, a bad name, role, validity or IP address.
    """
    _check_name(name, "name")
    _check_days(days)
    try:
        role = Role(role)
    except ValueError as e:
        raise ConfigError(f"unknown role {role!r}: use one of {', '.join(r.value for r in Role)}") from e
    ca_cert, ca_key = load_ca(directory)
    dns_names, ip_texts = _default_sans(role, name, dns, ips)
    try:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_texts]
    except ValueError as e:
        raise ConfigError(f"bad subject alternative name: {e}") from e
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    # The RC-TCB serves the API; an agent serves the RC-TCB's orders and receives migrations over
    # TLS, so both are servers too (by the names in their SANs). Operators are clients only.
    if role in (Role.RCTCB, Role.AGENT):
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)

    # The role lives in the OU, which pki.issue does not name: the subject is built here.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SMIG"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    # EC keys sign the handshake; they never encipher.
    issued = sign_leaf(KeyPair(ca_key, ca_cert), subject, usages=usages, sans=sans, days=days)

    target = out if out is not None else directory / "issued" / name
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = IssuedFiles(cert=target / "cert.pem", key=target / "key.pem", ca=directory / CA_CERT)
    _write(files.key, issued.key_pem(), 0o600)
    _write(files.cert, issued.cert_pem(), 0o644)
    log.info("issued %s certificate for %s in %s", role.value, name, target)
    return files


def _load_cert(data: str | bytes) -> x509.Certificate:
    raw = data.encode() if isinstance(data, str) else data
    try:
        # PEM as stored in files; DER as ssl.SSLSocket.getpeercert(binary_form=True) hands it over.
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError as e:
        raise CertificateRejected(
            "bad-certificate", f"certificate rejected: not a readable X.509 certificate ({e})"
        ) from e


def _one(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str):
        return None  # two OUs would make the role ambiguous: refuse rather than pick one
    return values[0].value


def verify_issued(cert_pem: str | bytes, ca_cert: x509.Certificate) -> x509.Certificate:
    """The certificate in ``cert_pem`` (PEM, or DER as a TLS peer certificate) if this region's CA
    issued it to an identity; its validity in time is :func:`identity_at`'s to check.

    Raises:
        CertificateRejected: unreadable or a CA certificate ("bad-certificate"); another issuer,
            or a signature that does not verify under the CA's key ("foreign-certificate").
    """
    cert = _load_cert(cert_pem)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:  # the CA's own certificate is self-signed, so the signature check alone would pass it
        raise CertificateRejected("bad-certificate", "certificate rejected: a CA certificate is not an identity")
    ca_key = ca_cert.public_key()
    hash_alg = cert.signature_hash_algorithm
    if not isinstance(ca_key, ec.EllipticCurvePublicKey) or cert.issuer != ca_cert.subject or hash_alg is None:
        raise CertificateRejected(
            "foreign-certificate",
            f"certificate rejected: issued by {cert.issuer.rfc4514_string()!r}, not by this region's CA "
            f"({ca_cert.subject.rfc4514_string()!r}); ask the region's operator for a certificate",
        )
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_alg))
    except InvalidSignature as e:
        # Same issuer name, other key: a CA made for the same region elsewhere (or a forgery).
        raise CertificateRejected(
            "foreign-certificate",
            "certificate rejected: not signed by this region's CA (it names the CA as issuer, but the signature "
            "does not verify: another CA of the same name, or a forgery)",
        ) from e
    return cert


def identity_at(cert: x509.Certificate, now: dt.datetime) -> Identity:
    """Who a certificate :func:`verify_issued` accepted speaks for, if it is valid at ``now``.

    Raises:
        CertificateRejected: outside its validity ("expired-certificate"); no single known role in
            its OU or no valid name in its CN ("bad-certificate").
    """
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateRejected(
            "expired-certificate",
            f"certificate rejected: valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not at {now:%Y-%m-%d %H:%M} UTC; "
            "ask the region's operator for a new one",
        )
    role_text, name = _one(cert, NameOID.ORGANIZATIONAL_UNIT_NAME), _one(cert, NameOID.COMMON_NAME)
    if role_text is None or role_text not in {r.value for r in Role}:
        roles = ", ".join(r.value for r in Role)
        raise CertificateRejected(
            "bad-certificate", f"certificate rejected: its OU ({role_text!r}) is none of the roles {roles}"
        )
    if name is None or not valid_vm_name(name):
        raise CertificateRejected("bad-certificate", f"certificate rejected: no valid name in its CN ({name!r})")
    return Identity(Role(role_text), name)


def identity_of(cert_pem: str | bytes, ca_cert: x509.Certificate, *, now: dt.datetime | None = None) -> Identity:
    """Who a certificate speaks for, once it is shown to be this CA's and valid at ``now``.

    Raises:
        CertificateRejected (a ConfigError): see :func:`verify_issued` and :func:`identity_at`.
    """
    return identity_at(verify_issued(cert_pem, ca_cert), now or dt.datetime.now(dt.UTC))


def _context(purpose: ssl.Purpose, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    try:
        # cafile given: only the region CA is trusted, never the system's public roots.
        context = ssl.create_default_context(purpose, cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load TLS credentials ({cert}, {key}, {ca}): {e}") from e
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS for the RC-TCB: presents ``cert`` and admits only peers with a certificate from ``ca``.

    Raises:
        ConfigError: a file is missing or unreadable, or the key does not match the certificate.
    """
    context = _context(ssl.Purpose.CLIENT_AUTH, cert, key, ca)
    context.verify_mode = ssl.CERT_REQUIRED  # no certificate, no conversation
    return context


def client_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """TLS for an agent or operator: presents ``cert``, checks the server's chain and hostname against ``ca``.

    Raises:
        ConfigError: a file is missing or unreadable, or the key does not match the certificate.
    """
    context = _context(ssl.Purpose.SERVER_AUTH, cert, key, ca)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context
