"""Generated certificates: signed by their CA, refused by a foreign one."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from smig.errors import ConfigError
from smig.pki import dh_params_pem, ensure_local_migration_tls, generate_ca, issue, tls_config_for


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


def _der_integers(pem: bytes) -> list[int]:
    """The INTEGERs of a PEM-wrapped DER SEQUENCE of INTEGERs (a PKCS #3 DHParameter), read by hand."""
    lines = pem.decode().strip().splitlines()
    assert lines[0] == "-----BEGIN DH PARAMETERS-----" and lines[-1] == "-----END DH PARAMETERS-----"
    der = base64.b64decode("".join(lines[1:-1]))

    def length(at: int) -> tuple[int, int]:
        first = der[at]
        if first < 0x80:
            return first, at + 1
        n = first & 0x7F
        return int.from_bytes(der[at + 1 : at + 1 + n], "big"), at + 1 + n

    assert der[0] == 0x30
    total, at = length(1)
    assert at + total == len(der), "the SEQUENCE must be the whole file"
    out = []
    while at < len(der):
        assert der[at] == 0x02
        n, at = length(at + 1)
        out.append(int.from_bytes(der[at : at + n], "big", signed=True))
        at += n
    return out


def _probably_prime(n: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_every_tls_dir_carries_rfc_7919_ffdhe2048_so_qemu_need_not_generate_a_group(tmp_path: Path) -> None:
    tls = ensure_local_migration_tls(tmp_path)
    prime, generator = _der_integers((Path(tls.directory) / "dh-params.pem").read_bytes())
    # The RFC's prime as its text prints it: the first and last 64 bits are all ones, and the
    # words after the first come from e.
    assert f"{prime:x}".startswith("ffffffffffffffffadf85458a2bb4a9aafdc5620273d3cf1")
    assert f"{prime:x}".endswith("886b423861285c97ffffffffffffffff")
    assert prime.bit_length() == 2048 and generator == 2
    assert _probably_prime(prime) and _probably_prime((prime - 1) // 2), "a safe prime"
    # A directory made before the file existed gets it on next use.
    (Path(tls.directory) / "dh-params.pem").unlink()
    assert ensure_local_migration_tls(tmp_path) == tls
    assert _der_integers((Path(tls.directory) / "dh-params.pem").read_bytes()) == [prime, 2]


def test_a_der_integer_with_its_high_bit_set_keeps_a_leading_zero() -> None:
    assert _der_integers(dh_params_pem(0x80, 2)) == [0x80, 2]
    assert _der_integers(dh_params_pem(2**1024 - 1, 5)) == [2**1024 - 1, 5]
