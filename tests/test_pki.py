"""Generated certificates: signed by their CA, refused by a foreign one."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from smig.errors import ConfigError
from smig.pki import ensure_local_migration_tls, generate_ca, issue, tls_config_for


def _verify(cert: x509.Certificate, ca: x509.Certificate) -> None:
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)


def test_issued_certificate_chains_to_its_ca_only() -> None:
    ca, impostor = generate_ca("ca"), generate_ca("ca")  # same name, other key
    leaf = issue(ca, "host-1", ip_addresses=("10.99.0.1",))
    _verify(leaf.cert, ca.cert)
    with pytest.raises(InvalidSignature):
        _verify(leaf.cert, impostor.cert)
    san = leaf.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host-1"]


def test_local_tls_is_generated_once_with_private_keys_private(tmp_path: Path) -> None:
    first = ensure_local_migration_tls(tmp_path)
    key = Path(first.directory) / "server-key.pem"
    before = key.read_bytes()
    assert key.stat().st_mode & 0o077 == 0
    again = ensure_local_migration_tls(tmp_path)
    assert again == first and key.read_bytes() == before


def test_incomplete_tls_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lacks ca-cert\.pem"):
        tls_config_for(tmp_path, "x")
