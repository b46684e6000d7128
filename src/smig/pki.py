"""Certificates for SMIG, generated on the machine that uses them (never committed).

A CA signs certificates that serve both as TLS server and client identities. For QEMU's
migration TLS, :func:`write_qemu_tls_dir` lays the files out the way QEMU's ``tls-creds-x509``
object reads them.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smig.errors import ConfigError
from smig.model import TLSConfig


@dataclass(frozen=True)
class KeyPair:
    """A private key and the certificate that binds it to a name."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SMIG"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def generate_ca(common_name: str, *, days: int = 3650, now: dt.datetime | None = None) -> KeyPair:
    """A new self-signed CA."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(key, cert)


def sign_leaf(
    ca: KeyPair,
    subject: x509.Name,
    *,
    usages: Sequence[x509.ObjectIdentifier],
    sans: Sequence[x509.GeneralName] = (),
    key_encipherment: bool = False,
    days: int = 825,
    now: dt.datetime | None = None,
) -> KeyPair:
    """A new EC key and a certificate for it naming ``subject``, signed by ``ca``.

    ``usages`` are the extended key usages (server and/or client auth). ``key_encipherment``
    is for QEMU: with a critical key usage, its GnuTLS checks demand the bit even for EC keys.
    """
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a peer's clock running a little behind
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=key_encipherment,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if sans:  # an empty SAN extension is invalid; a client-only certificate needs none
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return KeyPair(key, builder.sign(ca.key, hashes.SHA256()))


def issue(
    ca: KeyPair,
    common_name: str,
    *,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    days: int = 825,
    now: dt.datetime | None = None,
) -> KeyPair:
    """A certificate signed by ``ca``, valid as both TLS server and TLS client."""
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names or (common_name,)]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return sign_leaf(ca, _name(common_name), usages=usages, sans=sans, key_encipherment=True, days=days, now=now)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def write_qemu_tls_dir(directory: Path, ca: KeyPair, identity: KeyPair) -> None:
    """Write ``identity`` as both QEMU's server and client credentials, trusting ``ca``."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    _write(directory / "ca-cert.pem", ca.cert_pem(), 0o644)
    for role in ("server", "client"):
        _write(directory / f"{role}-cert.pem", identity.cert_pem(), 0o644)
        _write(directory / f"{role}-key.pem", identity.key_pem(), 0o600)
    write_dh_params(directory)


def _ffdhe2048_prime() -> int:
    """RFC 7919's ffdhe2048 prime, from its definition there:
    p = 2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1, with e summed as 1/k! exactly."""
    guard = 64  # bits below the point, so that the floor is exact
    term, total, k = 1 << (1918 + guard), 0, 0
    while term:
        total += term
        k += 1
        term //= k
    return 2**2048 - 2**1984 + ((total >> guard) + 560316) * 2**64 - 1


FFDHE2048_P = _ffdhe2048_prime()
DH_PARAMS_FILE = "dh-params.pem"


def write_dh_params(directory: Path) -> None:
    """Give a QEMU credentials directory its Diffie-Hellman group, RFC 7919's ffdhe2048.

    Without ``dh-params.pem``, a QEMU that receives a migration over TLS generates 2048-bit DH
    parameters on the spot, each time: 0.1-0.7 s of every destination's preparation on this
    machine. A standard, published group costs nothing and is what TLS 1.3 itself uses."""
    _write(directory / DH_PARAMS_FILE, dh_params_pem(FFDHE2048_P, 2), 0o644)


def dh_params_pem(prime: int, generator: int) -> bytes:
    """PKCS #3 ``DHParameter`` (SEQUENCE of the two INTEGERs) in DER, as the PEM GnuTLS imports.
    Written here: ``cryptography`` deprecates finite-field DH, and this is two integers."""
    body = _der_integer(prime) + _der_integer(generator)
    der = b"\x30" + _der_length(len(body)) + body
    lines = textwrap.wrap(base64.b64encode(der).decode("ascii"), 64)
    return ("-----BEGIN DH PARAMETERS-----\n" + "\n".join(lines) + "\n-----END DH PARAMETERS-----\n").encode()


def _der_integer(value: int) -> bytes:
    content = value.to_bytes(value.bit_length() // 8 + 1, "big")  # a leading zero keeps it positive
    return b"\x02" + _der_length(len(content)) + content


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


LOCAL_TLS_NAME = "smig-local"


def ensure_local_migration_tls(home: Path) -> TLSConfig:
    """TLS credentials for migrations on this machine, generated on first use.

    A fresh CA and one identity named ``smig-local`` (also valid for 127.0.0.1), stored under
    ``$SMIG_HOME/pki/migration``. The CA key is not kept: nothing else is ever signed by it.
    """
    directory = home / "pki" / "migration"
    if not (directory / "server-key.pem").exists():
        ca = generate_ca("SMIG local migration CA")
        ident = issue(ca, LOCAL_TLS_NAME, dns_names=(LOCAL_TLS_NAME, "localhost"), ip_addresses=("127.0.0.1",))
        write_qemu_tls_dir(directory, ca, ident)
    elif not (directory / DH_PARAMS_FILE).exists():
        write_dh_params(directory)  # a directory from before SMIG wrote them
    return tls_config_for(directory, LOCAL_TLS_NAME)


def tls_config_for(directory: Path, hostname: str) -> TLSConfig:
    """A :class:`TLSConfig` for a QEMU credentials directory, checked for completeness.

    Raises:
        ConfigError: a file QEMU needs is missing.
    """
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"):
        if not (directory / f).exists():
            raise ConfigError(f"TLS directory {directory} lacks {f}")
    return TLSConfig(directory=str(directory), hostname=hostname)
