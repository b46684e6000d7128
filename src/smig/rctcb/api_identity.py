"""Who is calling the RC-TCB API: the client certificate the TLS layer verified, read again here.

The server (``smig.rctcb.server``) runs with client certificates required and hands the verified
chain to the app in the ASGI scope, per the ASGI TLS extension:
``scope["extensions"]["tls"]["client_cert_chain"]``, PEM strings, leaf first. The app does not take
the TLS layer's word for it: :func:`identify` checks again that the leaf was issued by the region
CA and is valid now, so an app mounted behind a misconfigured server still refuses strangers.

A certificate names a role in its subject's organizational unit (``agent``, ``operator``,
``rctcb``) and a name in its common name; an agent's name is its host id, which is what its
reports must be signed as.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class Role(StrEnum):
    """What a client certificate allows; the subject's OU, exactly."""

    AGENT = "agent"
    OPERATOR = "operator"
    RCTCB = "rctcb"


@dataclass(frozen=True)
class Identity:
    """A verified client: its role and its name (an agent's host id)."""

    role: Role
    name: str


class ApiError(Exception):
    """A request the API refuses: ``status`` (4xx), a machine ``reason`` and a message a person can act on.

    ``extra`` is merged into the JSON body next to ``error`` and ``reason``.
    """

    def __init__(self, status: int, reason: str, message: str, *, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "reason": self.reason, **self.extra}


def client_chain(scope: Mapping[str, Any]) -> Sequence[str | bytes] | None:
    """The client certificate chain (PEM, leaf first) the server put in ``scope``, None if absent."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain")
    if not chain or not isinstance(chain, list | tuple):
        return None
    return list(chain)


def _forbidden(reason: str, message: str) -> ApiError:
    return ApiError(403, reason, message)


def _one(name: x509.Name, oid: x509.ObjectIdentifier, what: str) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        # Two OUs would make the role ambiguous: refuse rather than pick one.
        raise _forbidden("bad-certificate", f"the client certificate must carry exactly one {what}, not {len(values)}")
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def verified_certificate(pem: str | bytes, ca_cert: x509.Certificate) -> x509.Certificate:
    """The certificate in ``pem`` if the region CA signed it (its validity in time is not checked here).

    Raises :class:`ApiError` (403) for a certificate that cannot be read, is a CA, or was not
    issued by ``ca_cert``.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii", "replace") if isinstance(pem, str) else pem)
    except (ValueError, TypeError) as e:
        raise _forbidden("bad-certificate", f"the client certificate cannot be read: {e}") from None
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise _forbidden("bad-certificate", "the client certificate is a CA certificate; use a leaf certificate")
    except x509.ExtensionNotFound:
        pass
    ca_key = ca_cert.public_key()
    hash_algorithm = cert.signature_hash_algorithm
    if not isinstance(ca_key, ec.EllipticCurvePublicKey) or hash_algorithm is None:
        raise _forbidden("foreign-certificate", "the client certificate was not issued by this region's CA")
    if cert.issuer != ca_cert.subject:
        raise _forbidden(
            "foreign-certificate",
            f"the client certificate was issued by {cert.issuer.rfc4514_string()!r}, not by this region's CA "
            f"({ca_cert.subject.rfc4514_string()!r}); ask the region's operator for a certificate",
        )
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_algorithm))
    except InvalidSignature:
        raise _forbidden(
            "foreign-certificate",
            "the client certificate names this region's CA as issuer but its signature does not verify; "
            "it was forged or issued by another CA of the same name",
        ) from None
    return cert


def identify(chain: Sequence[str | bytes] | None, *, ca_cert: x509.Certificate, now: float) -> Identity:
    """The identity a client certificate chain proves at time ``now`` (Unix seconds).

    Raises :class:`ApiError`: 401 ``"no-client-certificate"`` when there is no chain; 403
    ``"bad-certificate"`` (unreadable, a CA, no single OU/CN, an unknown role), ``"foreign-certificate"``
    (not issued by ``ca_cert``) or ``"expired-certificate"`` (outside its validity).
    """
    if not chain:
        raise ApiError(
            401,
            "no-client-certificate",
            "no client certificate reached the API; connect with the certificate the region CA issued to you",
        )
    return identity_of(verified_certificate(chain[0], ca_cert), now=now)


def identity_of(cert: x509.Certificate, *, now: float) -> Identity:
    """The role and name of a certificate :func:`verified_certificate` accepted, if it is valid at ``now``.

    Raises :class:`ApiError` (403) ``"expired-certificate"`` or ``"bad-certificate"``.
    """
    not_before, not_after = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    if not not_before <= now <= not_after:
        raise _forbidden(
            "expired-certificate",
            f"the client certificate is valid from {cert.not_valid_before_utc.isoformat()} to "
            f"{cert.not_valid_after_utc.isoformat()}, not now; ask the region's operator for a new one",
        )
    role = _one(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME, "organizational unit (the role)")
    name = _one(cert.subject, NameOID.COMMON_NAME, "common name")
    try:
        return Identity(Role(role), name)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise _forbidden("bad-certificate", f"the client certificate's role {role!r} is none of: {roles}") from None
