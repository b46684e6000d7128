"""The edge of the RC-TCB API, as a pure ASGI middleware: who is calling, how big the body is, what
was answered, and the record of every refusal.

In front of every route, before any byte of the body is read, the middleware

1. checks the client certificate (:func:`~smig.rctcb.api_identity.identify`): 401 without one,
   403 for a foreign, expired or malformed one, so a stranger's body is never parsed;
2. refuses a body over ``max_body_bytes`` with 413: at once if ``Content-Length`` says so, else
   as soon as the streamed bytes pass the limit; the body is then handed to the app in one piece;
3. counts the response in ``smig_api_requests_total{path,status}`` (``path`` is the route's
   template, so ids in URLs do not explode the label set).

Whether the caller's *role* may use a route is the route's own business (a FastAPI dependency),
since only the router knows the route. Every 4xx writes one ``api.rejected`` audit entry
(:func:`record_rejection`) and nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from starlette.responses import JSONResponse
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smig.model import HostRecord, TrustState
from smig.rctcb.api_identity import ApiError, Identity, client_chain, identify, identity_of, verified_certificate
from smig.rctcb.region import Region

IDENTITY_KEY = "smig.identity"  # where the middleware leaves the caller's Identity in the ASGI scope
# Verified certificates kept, so an agent's is not verified again on every request: enough for a
# region of thousands of hosts (at 1,024 a region of 5,000 verified nearly every request anew).
_CERT_CACHE = 16384


class ApiMetrics:
    """The app's Prometheus metrics, in a registry of its own (two apps in one process never mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reports = Counter(
            "smig_reports_total", "Signed reports received, by result and reason", ("result", "reason"),
            registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            "smig_api_requests_total", "API responses, by route and status", ("path", "status"), registry=self.registry
        )
        self.hosts = Gauge("smig_hosts", "IVT rows, by trust state", ("state",), registry=self.registry)
        self.ingest = Histogram(
            "smig_ingest_seconds",
            "Time to verify, decide on and commit one batch of reports",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )

    def render(self, rows: Mapping[str, HostRecord]) -> bytes:
        """The text exposition, with the host gauge read from ``rows`` now (it is a count, not an event)."""
        for state in TrustState:
            self.hosts.labels(state.value).set(sum(1 for r in rows.values() if r.state is state))
        return generate_latest(self.registry)


def record_rejection(
    region: Region,
    *,
    at: float,
    method: str,
    path: str,
    status: int,
    reason: str,
    message: str,
    client: Identity | None,
) -> None:
    """Write the ``api.rejected`` audit entry of one refused request (blocking: call it in a thread)."""
    body: dict[str, object] = {
        "method": method,
        "path": path[:512],  # a request cannot make the log arbitrarily big
        "status": status,
        "reason": reason,
        "message": message[:1024],
        "client": client.name if client else None,
        "role": client.role.value if client else None,
    }
    with region.store.transaction() as tx:
        tx.audit("api.rejected", client.name if client else "", body, at)


class ApiEdge:
    """See the module docstring. ``public_paths`` (the OpenAPI document and docs) need no certificate
    from the app: the server's mutual TLS still demands one."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        region: Region,
        ca_cert: x509.Certificate,
        clock: Callable[[], float],
        max_body_bytes: int,
        metrics: ApiMetrics,
        router: Router,
        public_paths: frozenset[str],
    ) -> None:
        self.app = app
        self.region = region
        self.ca_cert = ca_cert
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.router = router
        self.public_paths = public_paths
        # leaf PEM -> (its identity, valid from, valid until (Unix seconds), the certificate)
        self._certs: dict[str | bytes, tuple[Identity, float, float, x509.Certificate]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server's error middleware answers if the app raises

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._handle(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(self._route_path(scope), str(status)).inc()

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        identity: Identity | None = None
        try:
            if scope["path"] not in self.public_paths:
                identity = self._identify(scope)
                scope[IDENTITY_KEY] = identity
            first = await self._read_body(scope, receive)
        except ApiError as e:
            await refuse(self.region, self.clock, scope, receive, send, e, identity)
            return
        pending = [first]

        async def replay() -> Message:
            # The body in one message, then the real channel (a streaming response waits on it for
            # the client's disconnect).
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    def _identify(self, scope: Scope) -> Identity:
        chain = client_chain(scope)
        if not chain:
            return identify(chain, ca_cert=self.ca_cert, now=self.clock())  # raises the 401
        now = self.clock()
        cached = self._certs.get(chain[0])
        if cached is None:
            cert = verified_certificate(chain[0], self.ca_cert)
            identity = identity_of(cert, now=now)
            if len(self._certs) >= _CERT_CACHE:
                self._certs.clear()
            valid = (cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())
            cached = self._certs[chain[0]] = (identity, *valid, cert)
        identity, start, end, cert = cached
        if not start <= now <= end:  # validity in time is checked on every request
            return identity_of(cert, now=now)  # raises, with the validity in its message
        return identity

    async def _read_body(self, scope: Scope, receive: Receive) -> Message:
        limit = self.max_body_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message  # the client left: let the app see it
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise _too_large(total, limit, streamed=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    def _route_path(self, scope: Scope) -> str:
        routed = scope.get("route")  # the router leaves the route it picked in the scope
        if isinstance(getattr(routed, "path", None), str):
            return str(routed.path)  # type: ignore[union-attr]
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path matched but not the method
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"


def _too_large(size: int, limit: int, *, streamed: bool = False) -> ApiError:
    said = "sent more than" if streamed else "declares"
    return ApiError(
        413,
        "body-too-large",
        f"the request body {said} {size if not streamed else limit} bytes, over the {limit}-byte limit; "
        f"send fewer reports per request",
    )


async def refuse(
    region: Region,
    clock: Callable[[], float],
    scope: Scope,
    receive: Receive,
    send: Send,
    error: ApiError,
    client: Identity | None,
) -> None:
    """Answer ``error`` as JSON and put it on the record."""
    await asyncio.to_thread(
        record_rejection,
        region,
        at=clock(),
        method=str(scope.get("method", "")),
        path=str(scope.get("path", "")),
        status=error.status,
        reason=error.reason,
        message=error.message,
        client=client,
    )
    await JSONResponse(error.body(), error.status)(scope, receive, send)
