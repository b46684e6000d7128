"""The RC-TCB's HTTP API: agents send signed reports and read their assignments, operators enrol
hosts and read the IVT and its audit log, everyone entitled watches the effects live.

:func:`create_app` builds a FastAPI app over one :class:`~smig.rctcb.region.Region`. The server
(``smig.rctcb.server``) runs it behind mutual TLS; identity comes from the client certificate
(:mod:`smig.rctcb.api_identity`), size limits, request metrics and the record of refusals from the
ASGI edge (:mod:`smig.rctcb.api_edge`), bodies from :mod:`smig.rctcb.api_models`, the event
stream from :mod:`smig.rctcb.api_events`.

Endpoints (JSON under ``/v1``; roles in brackets)::

    POST /v1/hosts                      [operator]        enrol: 201 row; 400 bad key; 409 enrolled
    GET  /v1/hosts, /v1/hosts/{host}    [agent, operator] IVT rows; 404 unknown host
    GET  /v1/assignments/{monitor}      [agent: itself; operator] the subjects it measures
    POST /v1/reports                    [agent]           a batch of signed reports (see post_reports)
    POST /v1/noop                       [agent]           parse a batch, judge nothing: ingest baseline
    PUT  /v1/hosts/{host}/agent         [agent: itself]   enrol or re-sync (smig.rctcb.api_agents)
    PUT  /v1/hosts/{host}/vms           [agent: itself]   the VMs it runs (smig.rctcb.inventory)
    POST /v1/hosts/{host}/maintenance   [operator]        {"on": bool}: row and effects
    POST /v1/hosts/{host}/reenrol       [operator]        row and effects
    PUT  /v1/hosts/{host}/manifest      [operator]        approve the reference manifest it is measured against
    POST /v1/tick                       [operator, rctcb] let time pass: effects
    POST /v1/migrations/{id}/cancel     [operator]        stop one VM's move (before its source is fenced)
    GET  /v1/migrations[?all=true]      [operator]        evacuation orders; /v1/migrations/{id} one of them
    GET  /v1/audit?since=&limit=        [operator]        audit entries
    GET  /v1/audit/verify               [operator]        check the hash chain
    GET  /v1/events                     [agent, operator] server-sent events of every effect
    GET  /metrics                       [operator, rctcb] Prometheus text

Errors are JSON ``{"error": "<what to do>", "reason": "<word>"}``. The checks run in this order:
certificate (401 none, 403 bad/foreign/expired), body size (413), body JSON (400 unparseable,
422 off-schema), role (403), then the request itself (404 unknown host, 409...). Every 4xx is
on the audit record and changes nothing else in the IVT: one ``api.rejected`` entry, except for
a refused report batch, whose ``report.rejected`` entries (one per report) are its record.

Region calls block (SQLite and a lock), so they run in worker threads. The app has no global
state: its metrics registry, event broadcaster and tick clock live on ``app.state``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from cryptography import x509
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from smig.errors import AuditChainBroken, ConfigError, HostExists, MigrationError
from smig.model import HostRecord, Resources
from smig.rctcb.api_agents import add_agent_routes
from smig.rctcb.api_edge import IDENTITY_KEY, ApiEdge, ApiMetrics, record_rejection
from smig.rctcb.api_events import Broadcaster
from smig.rctcb.api_identity import ApiError, Identity, Role, client_chain, identify
from smig.rctcb.api_ingest import IngestQueue
from smig.rctcb.api_models import (
    AssignmentOut,
    AuditOut,
    AuditVerifyOut,
    CancelIn,
    DecisionOut,
    EnrolIn,
    ErrorOut,
    HostOut,
    HostsOut,
    MaintenanceIn,
    ManifestIn,
    MigrationsOut,
    NoopOut,
    ReportBatchIn,
    ReportResultOut,
    ReportsOut,
    TickIn,
    TickOut,
    audit_entry_out,
    effects_out,
    host_out,
)
from smig.rctcb.region import Decision, Region, ReportResult

__all__ = ["create_app", "require"]

# Refusals that say the sender may not submit this at all, as opposed to a report that is late,
# repeated or unreadable: a batch refused for one of these answers 403, else 422.
FORBIDDING_REASONS = frozenset({"wrong-agent", "forged", "not-assigned", "unknown-monitor"})


def require(*roles: Role) -> Callable[[Request], Awaitable[Identity]]:
    """A FastAPI dependency: the caller's :class:`Identity` if its role is one of ``roles``.

    The edge middleware has checked the certificate already; without it (an app mounted some other
    way) the certificate is checked here. Raises :class:`ApiError` 401/403.
    """
    allowed = frozenset(roles)

    async def dependency(request: Request) -> Identity:
        identity = request.scope.get(IDENTITY_KEY)
        if not isinstance(identity, Identity):
            state = request.app.state
            identity = identify(client_chain(request.scope), ca_cert=state.ca_cert, now=state.clock())
        if identity.role not in allowed:
            names = " or ".join(sorted(r.value for r in allowed))
            raise ApiError(
                403,
                "wrong-role",
                f"{request.method} {request.url.path} is for the {names} role; the certificate of "
                f"{identity.name!r} is for the {identity.role.value} role",
            )
        return identity

    return dependency


Agent = Annotated[Identity, Depends(require(Role.AGENT))]
Operator = Annotated[Identity, Depends(require(Role.OPERATOR))]
Reader = Annotated[Identity, Depends(require(Role.AGENT, Role.OPERATOR))]
Controller = Annotated[Identity, Depends(require(Role.OPERATOR, Role.RCTCB))]

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422)}


class Ticker:
    """The passing of time for :meth:`Region.tick`: each tick covers ``(previous, now]``, the span
    since the last one, whether the route or the service loop asked for it."""

    def __init__(self, region: Region, clock: Callable[[], float], publish: Callable[[Sequence[Any]], None]) -> None:
        self.region = region
        self.clock = clock
        self.publish = publish
        self.last = clock()
        self._lock = asyncio.Lock()

    async def tick(self, now: float | None = None) -> tuple[float, float, Decision]:
        """Tick to ``now`` (the clock's time if None): ``(now, previous, decision)``, effects published.

        Raises :class:`ApiError` (422) if ``now`` is before the last tick: deadlines already passed
        would fire twice.
        """
        async with self._lock:
            at = self.clock() if now is None else now
            previous = self.last
            if at < previous:
                raise ApiError(422, "tick-backwards", f"cannot tick to {at!r}: the last tick was at {previous!r}")
            decision = await asyncio.to_thread(self.region.tick, at, previous)
            self.last = at
        self.publish(decision.effects)
        return at, previous, decision


def _result_json(r: ReportResult) -> dict[str, Any]:
    """:func:`_result_out` as ``model_dump(exclude_none=True)`` gives it, without the model."""
    if r.report is None:
        return {"accepted": False, "monitor": r.monitor, "reason": r.reason, "message": r.message}
    return {"accepted": True, "monitor": r.monitor, "subject": r.report.subject, "sequence": r.report.sequence}


def _result_out(r: ReportResult) -> ReportResultOut:
    if r.report is None:
        return ReportResultOut(accepted=False, monitor=r.monitor, reason=r.reason, message=r.message)
    return ReportResultOut(accepted=True, monitor=r.monitor, subject=r.report.subject, sequence=r.report.sequence)


def create_app(
    region: Region,
    *,
    ca_cert: x509.Certificate,
    clock: Callable[[], float] = time.time,
    max_body_bytes: int = 4 << 20,
    heartbeat_s: float = 15.0,
    default_manifest: str = "",
) -> FastAPI:
    """The API over ``region``; clients must hold certificates ``ca_cert`` issued.

    ``clock`` gives Unix seconds: report freshness, certificate validity and audit times follow
    it. ``default_manifest`` lets unknown hosts' agents enrol themselves (ENROLLING, measured against
    it). ``app.state.publish(effects)`` sends effects to ``/v1/events`` and ``app.state.tick(now)``
    ticks the region, for the service loop; both must be called on the app's event loop.
    """
    metrics = ApiMetrics()
    events = Broadcaster()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        events.close()  # open event streams end, so the server can stop

    app = FastAPI(title="SMIG RC-TCB", version="1", lifespan=lifespan, responses=_ERRORS)
    ticker = Ticker(region, clock, events.publish)
    app.state.region = region
    app.state.ca_cert = ca_cert
    app.state.clock = clock
    app.state.metrics = metrics
    app.state.events = events
    app.state.publish = events.publish
    app.state.effect_hooks = events.hooks
    app.state.tick = ticker.tick
    app.state.cancel_order = None  # the service sets it to its orchestrator's cancel
    public = frozenset(
        p for p in (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if p
    )
    app.add_middleware(
        ApiEdge,
        region=region,
        ca_cert=ca_cert,
        clock=clock,
        max_body_bytes=max_body_bytes,
        metrics=metrics,
        router=app.router,
        public_paths=public,
    )
    _add_error_handlers(app, region, clock)
    # Routes go on the app itself, not an included router: the edge names a request by its route's template.
    _add_routes(app, region, clock, metrics, events, ticker, heartbeat_s)
    add_agent_routes(
        app,
        region,
        clock,
        events,
        require(Role.AGENT),
        require(Role.AGENT, Role.OPERATOR),
        default_manifest=default_manifest,
    )
    return app


def _add_error_handlers(app: FastAPI, region: Region, clock: Callable[[], float]) -> None:
    async def rejected(request: Request, error: ApiError) -> JSONResponse:
        identity = request.scope.get(IDENTITY_KEY)
        await asyncio.to_thread(
            record_rejection,
            region,
            at=clock(),
            method=request.method,
            path=request.url.path,
            status=error.status,
            reason=error.reason,
            message=error.message,
            client=identity if isinstance(identity, Identity) else None,
        )
        return JSONResponse(error.body(), error.status)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return await rejected(request, exc)

    async def on_invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            where = bad_json.get("loc", ("body", "?"))[-1]
            why = (bad_json.get("ctx") or {}).get("error", "JSON decode error")
            error = ApiError(400, "malformed-json", f"the request body is not JSON ({why} at character {where})")
        else:
            parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:3]]
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            error = ApiError(422, "invalid-request", f"the request does not fit the schema: {'; '.join(parts)}{more}")
        return await rejected(request, error)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        words = {404: "not-found", 405: "method-not-allowed"}
        error = ApiError(exc.status_code, words.get(exc.status_code, f"http-{exc.status_code}"), str(exc.detail))
        if exc.status_code == 404:
            error.message = f"there is no {request.url.path}; see /openapi.json for the API"
        if 400 <= exc.status_code < 500:
            return await rejected(request, error)
        return JSONResponse(error.body(), exc.status_code, headers=exc.headers)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http)


def _unknown_host(host: str) -> ApiError:
    return ApiError(404, "unknown-host", f"no host {host!r} is enrolled in this region; enrol it first")


def _add_routes(
    router: FastAPI,
    region: Region,
    clock: Callable[[], float],
    metrics: ApiMetrics,
    events: Broadcaster,
    ticker: Ticker,
    heartbeat_s: float,
) -> None:
    ingest = IngestQueue(region, clock)

    async def row_of(host: str) -> HostRecord:
        row = (await asyncio.to_thread(region.rows)).get(host)
        if row is None:
            raise _unknown_host(host)
        return row

    async def decided(host: str, decision: Decision) -> DecisionOut:
        events.publish(decision.effects)
        row = decision.rows.get(host) or await row_of(host)
        return DecisionOut(row=host_out(row), effects=effects_out(decision.effects))

    @router.post("/v1/hosts", status_code=201)
    async def enrol(body: EnrolIn, _: Operator) -> HostOut:
        """Enrol a host, ENROLLING (or TRUSTED if ``vouched``)."""
        capacity = Resources(body.capacity.vcpus, body.capacity.memory_mib)

        def run() -> Decision:
            return region.enroll(
                body.host,
                agent_key=body.agent_key,
                manifest=body.manifest,
                capacity=capacity,
                now=clock(),
                region=body.region,
                address=body.address,
                vouched=body.vouched,
            )

        try:
            decision = await asyncio.to_thread(run)
        except HostExists as e:
            raise ApiError(409, "host-exists", e.message) from e
        except ConfigError as e:
            raise ApiError(400, "bad-key", e.message) from e
        events.publish(decision.effects)
        return host_out(decision.rows.get(body.host) or await row_of(body.host))

    @router.get("/v1/hosts")
    async def list_hosts(_: Reader) -> HostsOut:
        rows = await asyncio.to_thread(region.rows)
        return HostsOut(hosts=[host_out(rows[h]) for h in sorted(rows)])

    @router.get("/v1/hosts/{host}")
    async def get_host(host: str, _: Reader) -> HostOut:
        return host_out(await row_of(host))

    @router.get("/v1/assignments/{monitor}")
    async def assignment(monitor: str, who: Reader) -> AssignmentOut:
        """The subjects ``monitor`` must measure. An agent may ask only about itself."""
        if who.role is Role.AGENT and who.name != monitor:
            raise ApiError(
                403,
                "not-yours",
                f"agent {who.name!r} may read only its own assignment, not that of {monitor!r}",
            )
        await row_of(monitor)
        assigned = await asyncio.to_thread(region.assignment)
        return AssignmentOut(monitor=monitor, subjects=sorted(s for s, ms in assigned.items() if monitor in ms))

    @router.post("/v1/reports", response_model=ReportsOut, response_model_exclude_none=True)
    async def post_reports(body: ReportBatchIn, who: Agent) -> Response:
        """Judge a batch of signed reports, in order, as sent by the caller's agent.

        200 when at least one report counted, with one result per report (in order). When none
        counted the same body comes with an error: 403 if any report was refused because the
        agent may not submit it (``wrong-agent``, ``forged``, ``not-assigned``, ``unknown-monitor``),
        else 422 (``malformed``, ``replayed``, ``out-of-order``, ``stale``, ``from-the-future``).
        Each refused report has a ``report.rejected`` audit entry; a refused one changes nothing else.
        """
        started = time.perf_counter()
        results = await ingest.submit(body.reports, who.name)  # judged with whatever else is waiting
        metrics.ingest.observe(time.perf_counter() - started)
        refused = Counter(r.reason for r in results if r.report is None)
        accepted = len(results) - sum(refused.values())
        # Counted per batch, not per report: a labelled counter's lookup and lock, times every
        # report, cost more than judging one.
        if accepted:
            metrics.reports.labels("accepted", "").inc(accepted)
        for reason, n in refused.items():
            metrics.reports.labels("rejected", reason).inc(n)
        events.publish([e for r in results for e in r.effects])
        if accepted:
            # Written here as ReportsOut would be (exclude_none): as models, 20 results a request
            # cost more than their TLS. The response model still documents the body.
            rejected = len(results) - accepted
            written = {"results": [_result_json(r) for r in results], "accepted": accepted, "rejected": rejected}
            return Response(json.dumps(written, separators=(",", ":")), media_type="application/json")
        out = ReportsOut(results=[_result_out(r) for r in results], accepted=accepted, rejected=len(results) - accepted)
        reasons = sorted({r.reason for r in results})
        status = 403 if FORBIDDING_REASONS.intersection(reasons) else 422
        reason = reasons[0] if len(reasons) == 1 else "reports-rejected"
        first = results[0]
        message = (
            f"none of the {len(results)} reports counted ({', '.join(reasons)}); "
            f"the first was refused because: {first.message}"
        )
        return JSONResponse({"error": message, "reason": reason, **out.model_dump(exclude_none=True)}, status)

    @router.post("/v1/noop")
    async def noop(body: ReportBatchIn, _: Agent) -> NoopOut:
        """Read and parse a batch like ``/v1/reports``, judge nothing: the ingest benchmark's baseline."""
        return NoopOut(results=[], accepted=0, rejected=0, count=len(body.reports))

    @router.post("/v1/hosts/{host}/maintenance")
    async def maintenance(host: str, body: MaintenanceIn, _: Operator) -> DecisionOut:
        """Take a host into maintenance or bring it back (through ENROLLING). A change the policy
        refuses (already there, untrusted) answers 200 with an ``effect.ignored`` effect."""
        await row_of(host)
        return await decided(host, await asyncio.to_thread(region.maintenance, host, body.on, clock()))

    @router.post("/v1/hosts/{host}/reenrol")
    async def reenrol(host: str, _: Operator) -> DecisionOut:
        """Start a host over in ENROLLING: the only way out of UNTRUSTED."""
        await row_of(host)
        return await decided(host, await asyncio.to_thread(region.reenroll, host, clock()))

    @router.post("/v1/tick")
    async def tick(_: Controller, body: TickIn | None = None) -> TickOut:
        """Let time pass to ``now`` (default: the app's clock): rows gone stale turn UNKNOWN, and so on."""
        now, previous, decision = await ticker.tick(body.now if body else None)
        return TickOut(now=now, previous=previous, effects=effects_out(decision.effects))

    @router.put("/v1/hosts/{host}/manifest")
    async def approve_manifest(host: str, body: ManifestIn, _: Operator) -> HostOut:
        """Approve the reference manifest ``host`` is measured against (after an upgrade, say)."""
        await row_of(host)
        return host_out(await asyncio.to_thread(region.approve_manifest, host, body.manifest, clock()))

    @router.get("/v1/migrations")
    async def migrations(
        _: Operator, everything: Annotated[bool, Query(alias="all", description="finished orders too")] = False
    ) -> MigrationsOut:
        """The evacuations' migration orders, in flight (or all of them)."""
        stored = await asyncio.to_thread(region.store.orders, not everything)
        return MigrationsOut(orders=[dict(o.body) for o in stored])

    @router.get("/v1/migrations/{order}")
    async def migration(order: str, _: Operator) -> dict[str, Any]:
        """One migration order: its state, source, target, attempts and why it is where it is."""
        stored = await asyncio.to_thread(region.store.orders, False)
        for o in stored:
            if o.id == order:
                return dict(o.body)
        raise ApiError(404, "unknown-order", f"no migration order {order!r}; GET /v1/migrations?all=true lists them")

    @router.post("/v1/migrations/{order}/cancel", status_code=202)
    async def cancel_migration(order: str, who: Operator, body: CancelIn | None = None) -> dict[str, Any]:
        """Stop one VM's move; it stays on its source (unless it landed already). 409 once the
        source was fenced or the order finished; 404 for an unknown order."""
        cancel = router.state.cancel_order
        if cancel is None:
            raise ApiError(409, "no-orchestrator", "this service drives no evacuations, so none can be cancelled")
        why = f"{who.name}: {body.reason}" if body and body.reason else who.name
        try:
            new = await cancel(order, why)
        except MigrationError as e:
            status, reason = (404, "unknown-order") if "no migration order" in e.message else (409, "not-cancellable")
            raise ApiError(status, reason, e.message) from e
        return dict(new.to_json())

    @router.get("/v1/audit")
    async def audit(
        _: Operator,
        since: Annotated[int, Query(ge=0, description="entries after this seq")] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> AuditOut:
        def read() -> AuditOut:
            entries = [audit_entry_out(e) for e in itertools.islice(region.store.audit_entries(since), limit)]
            return AuditOut(entries=entries, next=entries[-1].seq if entries else since)

        return await asyncio.to_thread(read)

    @router.get("/v1/audit/verify", response_model_exclude_none=True)
    async def audit_verify(_: Operator) -> AuditVerifyOut:
        """Check the audit log's hash chain end to end."""
        try:
            n = await asyncio.to_thread(region.store.verify_audit)
        except AuditChainBroken as e:
            return AuditVerifyOut(valid=False, entries=max(e.seq - 1, 0), seq=e.seq, error=e.message)
        return AuditVerifyOut(valid=True, entries=n)

    @router.get("/v1/events", response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
    async def event_stream(_: Reader) -> StreamingResponse:
        """Server-sent events: one ``event: <kind>`` / ``data: <effect JSON>`` per effect, a comment
        heartbeat in silences. A reader that falls far behind is dropped (the stream ends)."""
        return StreamingResponse(
            events.stream(heartbeat_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @router.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(_: Controller) -> Response:
        rows = await asyncio.to_thread(region.rows)
        return Response(metrics.render(rows), media_type=CONTENT_TYPE_LATEST)
