"""An agent's region-CA identity, laid out the way QEMU's ``tls-creds-x509`` reads it, for live
migrations over mutual TLS between hosts."""

from __future__ import annotations

import os
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from smig.errors import ConfigError
from smig.model import TLSConfig
from smig.pki import tls_config_for, write_dh_params

__all__ = ["migration_tls_dir"]


def migration_tls_dir(cert: Path, key: Path, ca: Path, out: Path, hostname: str) -> TLSConfig:
    """Lay out this agent's region-CA identity the way QEMU's ``tls-creds-x509`` reads it.

    ``out`` gets ``ca-cert.pem``, the identity twice, as ``server-*`` (receiving) and
    ``client-*`` (sending), and ``dh-params.pem`` (:func:`smig.pki.write_dh_params`); keys 0600,
    the directory 0700. ``hostname`` is the name (or IP
    address) the source checks in this host's certificate: it must be one of the certificate's
    subject alternative names. An agent certificate from :func:`smig.rctcb.ca.issue_identity`
    (P-256, TLS server and client) works as it is with QEMU 7.2 and GnuTLS.

    Raises:
        ConfigError: a file is missing or unreadable, the key is not the certificate's, the
            certificate is not the CA's, is not for both TLS server and client, or does not name
            ``hostname``.
    """
    try:
        cert_pem, key_pem, ca_pem = cert.read_bytes(), key.read_bytes(), ca.read_bytes()
        leaf, ca_cert = x509.load_pem_x509_certificate(cert_pem), x509.load_pem_x509_certificate(ca_pem)
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read the migration TLS credentials ({cert}, {key}, {ca}): {e}") from e
    if private.public_key() != leaf.public_key():
        raise ConfigError(f"{key} is not the key of {cert}")
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise ConfigError(f"{cert} was not issued by the CA in {ca}: {e}") from e
    try:
        usages = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    if not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= usages:
        raise ConfigError(f"{cert} must be valid for TLS server and client auth (issue it for the agent role)")
    if hostname not in _names_of(leaf):
        raise ConfigError(
            f"{cert} does not name {hostname!r} (it names {', '.join(sorted(_names_of(leaf))) or 'nothing'}); "
            "the source of a migration would refuse it: issue it with that name or address"
        )
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(out, 0o700)
        files = {"ca-cert.pem": (ca_pem, 0o644)}
        for role in ("server", "client"):
            files[f"{role}-cert.pem"] = (cert_pem, 0o644)
            files[f"{role}-key.pem"] = (key_pem, 0o600)
        for name, (data, mode) in files.items():
            fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(out / name, mode)
        write_dh_params(out)
    except OSError as e:
        raise ConfigError(f"cannot write the migration TLS directory {out}: {e.strerror or e}") from e
    return tls_config_for(out, hostname)


def _names_of(cert: x509.Certificate) -> set[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(a) for a in sans.get_values_for_type(x509.IPAddress) if isinstance(a, IPv4Address | IPv6Address)}
    return set(sans.get_values_for_type(x509.DNSName)) | ips
