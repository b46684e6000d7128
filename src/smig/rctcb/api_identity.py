"""Who is calling the RC-TCB API: the client certificate the TLS layer verified, read again here.

The server (``smig.rctcb.server``) runs with client certificates required and hands the verified
chain to the app in the ASGI scope, per the ASGI TLS extension:
``scope["extensions"]["tls"]["client_cert_chain"]``, PEM strings, leaf first. The app does not take
the TLS layer's word for it: :func:`identify` checks again, with the region CA's own checks
(:mod:`smig.rctcb.ca`), that the leaf was issued by the region CA and is valid now, so an app
mounted behind a misconfigured server still refuses strangers. This module only turns their
refusals into HTTP answers.

A certificate names a role in its subject's organizational unit (``agent``, ``operator``,
``rctcb``) and a name in its common name; an agent's name is its host id, which is what its
reports must be signed as.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509

from smig.errors import CertificateRejected
from smig.rctcb.ca import Identity, Role, identity_at, verify_issued

__all__ = ["ApiError", "Identity", "Role", "client_chain", "identify", "identity_of", "verified_certificate"]


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


def verified_certificate(pem: str | bytes, ca_cert: x509.Certificate) -> x509.Certificate:
    """The certificate in ``pem`` if the region CA issued it (validity in time is checked apart,
    so a verified certificate can be cached). Raises :class:`ApiError` 403."""
    try:
        return verify_issued(pem, ca_cert)
    except CertificateRejected as e:
        raise ApiError(403, e.reason, e.message) from None


def identity_of(cert: x509.Certificate, *, now: float) -> Identity:
    """The role and name of a verified certificate, if it is valid at ``now`` (Unix seconds).
    Raises :class:`ApiError` 403."""
    try:
        return identity_at(cert, dt.datetime.fromtimestamp(now, dt.UTC))
    except CertificateRejected as e:
        raise ApiError(403, e.reason, e.message) from None


def identify(chain: Sequence[str | bytes] | None, *, ca_cert: x509.Certificate, now: float) -> Identity:
    """The identity a client certificate chain proves at time ``now`` (Unix seconds).

    Raises :class:`ApiError`: 401 ``"no-client-certificate"`` when there is no chain; 403
    ``"bad-certificate"``, ``"foreign-certificate"`` or ``"expired-certificate"`` otherwise.
    """
    if not chain:
        raise ApiError(
            401,
            "no-client-certificate",
            "no client certificate reached the API; connect with the certificate the region CA issued to you",
        )
    return identity_of(verified_certificate(chain[0], ca_cert), now=now)
