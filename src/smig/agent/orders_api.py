"""The agent's orders API: the RC-TCB's orders to this host, over HTTPS with mutual TLS.

:func:`create_orders_app` exposes an :class:`~smig.agent.executor.OrderExecutor`;
:func:`serve_orders` runs it on exactly one address, requiring a client certificate from the
region CA on every connection. The RC-TCB's client is :class:`smig.rctcb.agent_http.HttpAgentClient`.

Endpoints (JSON; only the RC-TCB may call them)::

    PUT  /v1/orders/{order_id}/incoming          {"vm": VM}                        200 {"order_id", "address"}
    POST /v1/orders/{order_id}/incoming/abort    {"vm": NAME}                      200 {"order_id"}
    PUT  /v1/orders/{order_id}/migration         {"vm": NAME, "target_address": A} 202 {"order_id"}
    GET  /v1/orders/{order_id}/migration?vm=NAME                                   200 PROGRESS
    POST /v1/orders/{order_id}/migration/cancel  {"vm": NAME}                      200 {"order_id"}
    PUT  /v1/orders/{order_id}/restart           {"vm": VM}                        200 {"order_id"}
    GET  /v1/vms/{vm}/where                                                        200 {"vm", "where"}

``VM`` is a placement as the RC-TCB holds it: ``{"name", "host", "needs": {"vcpus",
"memory_mib"}, "priority", "anti_affinity", "spec"}``, ``spec`` being the VM's VMSpec as JSON.
``PROGRESS`` is ``{"status": "active"|"completed"|"failed"|"cancelled"|"none",
"transferred_bytes", "remaining_bytes", "error"}``; ``where`` is ``running``, ``incoming``,
``paused`` or ``absent``. Every call is idempotent per order id (see the executor): PUT is
meant literally. ``incoming`` answers the opaque address ``A`` the source's ``migration`` takes.

Errors are ``{"error": "<what to do>", "reason": "<word>"}``. The certificate is checked first,
before the body is read: 401 ``no-client-certificate``; 403 ``bad-certificate``,
``foreign-certificate``, ``expired-certificate`` or ``wrong-role`` (any role but ``rctcb``).
Then 422 ``bad-request`` for a body or path off the schema, and the executor's errors as
:data:`smig.rctcb.agent_http.WIRE_ERRORS` says (404 ``vm-not-found``, 409 ``migration-refused``,
502 ``destination-unreachable``, 500 ``hypervisor-error``, ...).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter types at run time.
import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

from cryptography import x509
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from smig.agent.executor import MAX_PROGRESS_WAIT_S, OrderExecutor
from smig.errors import CertificateRejected, SmigError
from smig.model import PlacedVM, Resources
from smig.rctcb.agent_http import wire_error
from smig.rctcb.ca import Role, identity_of, server_ssl_context
from smig.rctcb.server import NotifyingServer, _bind, mutual_tls_config

__all__ = ["create_orders_app", "serve_orders"]

log = logging.getLogger(__name__)

NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
ORDER_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
OrderId = Annotated[str, PathParam(pattern=ORDER_ID)]
VMName = Annotated[str, Field(pattern=NAME)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NeedsIn(_In):
    vcpus: int = Field(ge=0)
    memory_mib: int = Field(ge=0)


class PlacedVMIn(_In):
    name: VMName
    host: str = Field(max_length=63)
    needs: NeedsIn
    priority: int = 0
    anti_affinity: str = Field("", max_length=63)
    spec: str = Field("", max_length=4096)

    def placed(self) -> PlacedVM:
        needs = Resources(self.needs.vcpus, self.needs.memory_mib)
        return PlacedVM(self.name, self.host, needs, self.priority, self.anti_affinity, self.spec)


class PlacedOrderIn(_In):
    vm: PlacedVMIn


class VMIn(_In):
    vm: VMName


class MigrateIn(_In):
    vm: VMName
    target_address: str = Field(min_length=1, max_length=2048)


class OrderOut(BaseModel):
    order_id: str


class AddressOut(OrderOut):
    address: str


class ProgressOut(BaseModel):
    status: str
    transferred_bytes: int
    remaining_bytes: int
    error: str | None


class WhereOut(BaseModel):
    vm: str
    where: str


class _RctcbOnly:
    """ASGI middleware: every HTTP request needs a client certificate of role ``rctcb`` from the
    region CA, checked before the body is read (see the module docstring)."""

    def __init__(self, app: ASGIApp, ca_cert: x509.Certificate) -> None:
        self.app = app
        self.ca_cert = ca_cert

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                status, reason, message = refusal
                log.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), message)
                await JSONResponse({"error": message, "reason": reason}, status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        chain = ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_chain")
        if not chain:
            return (
                401,
                "no-client-certificate",
                "no client certificate: only the RC-TCB, with its certificate, gives orders",
            )
        try:
            identity = identity_of(chain[0], self.ca_cert)
        except CertificateRejected as e:
            return 403, e.reason, e.message
        if identity.role is not Role.RCTCB:
            return 403, "wrong-role", (
                f"orders come from the RC-TCB only; the certificate of {identity.name!r} is for the "
                f"{identity.role.value} role"
            )  # fmt: skip
        return None


def create_orders_app(executor: OrderExecutor, *, ca_cert: x509.Certificate) -> FastAPI:
    """The orders API over ``executor``, answering only the region's RC-TCB (``ca_cert``: the region CA)."""
    app = FastAPI(title="SMIG agent orders", docs_url=None, redoc_url=None)
    app.add_middleware(_RctcbOnly, ca_cert=ca_cert)

    @app.exception_handler(SmigError)
    async def smig_error(request: Request, e: SmigError) -> JSONResponse:
        status, reason = wire_error(e)
        return JSONResponse({"error": e.message, "reason": reason}, status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        return JSONResponse({"error": f"bad request: {problems}", "reason": "bad-request"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not-found", 405: "method-not-allowed"}.get(e.status_code, "http-error")
        return JSONResponse({"error": str(e.detail), "reason": reason}, e.status_code)

    @app.put("/v1/orders/{order_id}/incoming")
    async def prepare_incoming(order_id: OrderId, body: PlacedOrderIn) -> AddressOut:
        address = await executor.prepare_incoming(body.vm.placed(), order_id)
        return AddressOut(order_id=order_id, address=address)

    @app.post("/v1/orders/{order_id}/incoming/abort")
    async def abort_incoming(order_id: OrderId, body: VMIn) -> OrderOut:
        await executor.abort_incoming(body.vm, order_id)
        return OrderOut(order_id=order_id)

    @app.put("/v1/orders/{order_id}/migration", status_code=202)
    async def migrate(order_id: OrderId, body: MigrateIn) -> OrderOut:
        await executor.migrate(body.vm, body.target_address, order_id)
        return OrderOut(order_id=order_id)

    @app.get("/v1/orders/{order_id}/migration")
    async def progress(
        order_id: OrderId,
        vm: Annotated[str, Query(pattern=NAME)],
        wait: Annotated[float, Query(ge=0, le=MAX_PROGRESS_WAIT_S)] = 0.0,
    ) -> ProgressOut:
        """Where the migration stands; with ``wait``, answered once it is no longer active, or
        after that many seconds."""
        view = await executor.progress(vm, order_id, wait_s=wait)
        return ProgressOut(
            status=view.status.value,
            transferred_bytes=view.transferred_bytes,
            remaining_bytes=view.remaining_bytes,
            error=view.error,
        )

    @app.post("/v1/orders/{order_id}/migration/cancel")
    async def cancel(order_id: OrderId, body: VMIn) -> OrderOut:
        await executor.cancel(body.vm, order_id)
        return OrderOut(order_id=order_id)

    @app.put("/v1/orders/{order_id}/restart")
    async def start_from_disk(order_id: OrderId, body: PlacedOrderIn) -> OrderOut:
        await executor.start_from_disk(body.vm.placed(), order_id)
        return OrderOut(order_id=order_id)

    @app.get("/v1/vms/{vm}/where")
    async def where(vm: Annotated[str, PathParam(pattern=NAME)]) -> WhereOut:
        return WhereOut(vm=vm, where=(await executor.where(vm)).value)

    return app


class _Server(NotifyingServer):
    """uvicorn's server inside a process that owns its signals: it leaves SIGTERM/SIGINT to the
    process (the orders server stops when its task is cancelled)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_orders(
    app: Any,
    host: str,
    port: int,
    *,
    cert: Path,
    key: Path,
    ca: Path,
    ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve ``app`` on exactly ``host:port`` (0: a port the kernel picks, passed to ``ready``)
    with mutual TLS: no client certificate from the region CA ``ca``, no connection. Runs until
    cancelled, then shuts down cleanly.

    Raises:
        ConfigError: the credentials cannot be loaded, or the address cannot be bound.
    """
    context = server_ssl_context(cert, key, ca)  # CERT_REQUIRED: a stranger does not get past TLS
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    config = mutual_tls_config(app, context)
    server = _Server(config, lambda: ready(host, bound) if ready is not None else None)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True  # finish the requests in hand, close the connections
        with contextlib.suppress(Exception):
            await task
        raise
    finally:
        sock.close()
