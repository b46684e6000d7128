"""The RC-TCB service: its configuration file, the HTTPS server with mutual TLS, and the clock.

``smig rctcb serve --config FILE`` runs :func:`serve`: it opens the IVT store, builds the API over
a :class:`~smig.rctcb.region.Region`, and serves it with uvicorn on exactly the address the
configuration names, requiring a client certificate from the region CA on every connection.
A background task lets time pass (``Region.tick``) once a second, so hosts that stop being
measured turn UNKNOWN without anyone asking; another drives evacuations through the hosts' agents
(:mod:`smig.rctcb.evacuations`, :mod:`smig.rctcb.agent_http`), resuming on start whatever a
previous run left in flight.

uvicorn does not hand the client certificate to the application, so :class:`PeerCertProtocol`
puts it in the ASGI scope as the ASGI TLS extension describes
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM, leaf first).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from smig.errors import ConfigError, HypervisorError
from smig.ivt.base import open_store
from smig.paths import smig_home
from smig.rctcb.agents import AgentDirectory, NoAgents
from smig.rctcb.evacuations import Evacuations
from smig.rctcb.orchestrator import Orchestrator
from smig.rctcb.orders import OrchestratorConfig
from smig.rctcb.placement import PlacementConfig
from smig.rctcb.policy import PolicyConfig
from smig.rctcb.region import Region, RegionConfig
from smig.tomlconfig import listen_address, load_sections, number

log = logging.getLogger(__name__)

ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``smig rctcb serve`` needs; built from a TOML file by :func:`load_config`."""

    host: str
    port: int
    store: str
    ca: Path
    cert: Path
    key: Path
    region: RegionConfig = field(default_factory=RegionConfig)
    tick_interval_s: float = 1.0
    max_body_bytes: int = 4 << 20
    manifest: str = ""  # the default manifest's digest: unknown hosts' agents may enrol themselves
    agents: bool = True  # drive evacuations through the hosts' agents (False: plan them only)
    fencing: str = "none"  # "netns", "home", "command" or "none": how a refusing source is stopped out of band
    fence_netns: str = "/run/netns/{host}"
    fence_home: str = ""  # "home": the host's driver home, with {host} (the loopback lab)
    fence_command: tuple[str, ...] = ()
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    # The concurrency limits (``freshness_s`` comes from the policy, and is set where it is used).
    placement: PlacementConfig = field(default_factory=PlacementConfig)


_SECTIONS: dict[str, frozenset[str]] = {
    "rctcb": frozenset({"listen", "store", "ca", "cert", "key", "tick_interval_s", "max_body_bytes", "manifest"}),
    "agents": frozenset(
        {
            "enabled",
            "fencing",
            "fence_netns",
            "fence_home",
            "fence_command",
            "call_timeout_s",
            "completion_timeout_per_gib_s",
            "completion_timeout_floor_s",
            "max_attempts",
            "fence_timeout_s",
            "progress_wait_s",
        }
    ),
    "placement": frozenset({"max_outbound_per_host", "max_inbound_per_host", "max_per_region", "prepare_ahead"}),
    "policy": frozenset({"kind", "freshness_s", "unknown_grace_s", "strike_limit"}),
    "reports": frozenset({"max_age_s", "max_skew_s", "monitors_per_host"}),
}

EXAMPLE = """\
# smig rctcb serve --config THIS_FILE
[rctcb]
listen = "127.0.0.1:8443"          # the one address the service listens on
store = "sqlite:///{home}/rctcb/ivt.sqlite"
ca = "{home}/rctcb/ca/ca.pem"      # clients must present a certificate from this CA
cert = "{home}/rctcb/ca/issued/rctcb/cert.pem"
key = "{home}/rctcb/ca/issued/rctcb/key.pem"
tick_interval_s = 1.0

[policy]
kind = "quorum"                    # or "immediate": the first verified mismatch evacuates
freshness_s = 10.0                 # no verified report for longer: UNKNOWN, and never a target
unknown_grace_s = 30.0             # UNKNOWN this long: evacuate
strike_limit = 3                   # contradicted accusations that make a monitor SUSPECT

[reports]
max_age_s = 30.0                   # a report older than this is stale
max_skew_s = 5.0                   # how far in the future a report's times may be
monitors_per_host = 2

[agents]
enabled = true                     # drive evacuations through the hosts' agents
fencing = "command"                # how a source that will not migrate is stopped out of band:
fence_command = ["/usr/local/sbin/fence-vm", "{host}", "{vm}"]   # e.g. a BMC/IPMI script; or
# fencing = "netns"; fence_netns = "/run/netns/{host}"   (the lab: hosts are network namespaces)
call_timeout_s = 30.0              # one call to an agent
progress_wait_s = 1.0              # a progress call waits this long for its migration to end
completion_timeout_per_gib_s = 60.0
completion_timeout_floor_s = 30.0  # a live migration running longer than this (or per GiB): fence
max_attempts = 3                   # targets tried live before fencing and a cold restart

[placement]
max_outbound_per_host = 2          # migrations sending from one host at once (KubeVirt's default)
max_inbound_per_host = 2           # arriving at one host at once
max_per_region = 5                 # sending in the region at once
prepare_ahead = 2                  # moves past each limit that prepare their target meanwhile
"""


def example_config(home: Path | None = None) -> str:
    # Not str.format: the example's fencing lines hold {host} and {vm} placeholders of their own.
    return EXAMPLE.replace("{home}", str(home or smig_home()))


def parse_config(text: str, *, source: str = "the configuration") -> ServiceConfig:
    """Raises ConfigError naming the key that is wrong, missing or unknown."""
    data = load_sections(text, _SECTIONS, source)
    service: dict[str, Any] = data.get("rctcb", {})
    policy: dict[str, Any] = data.get("policy", {})
    reports: dict[str, Any] = data.get("reports", {})
    home = smig_home()
    host, port = listen_address(service.get("listen", "127.0.0.1:8443"), "rctcb.listen")
    region = RegionConfig(
        policy=PolicyConfig(
            kind=policy.get("kind", "quorum"),
            freshness_s=number(policy, "freshness_s", 10.0),
            unknown_grace_s=number(policy, "unknown_grace_s", 30.0),
            strike_limit=int(number(policy, "strike_limit", 3)),
        ),
        max_age_s=number(reports, "max_age_s", 30.0),
        max_skew_s=number(reports, "max_skew_s", 5.0),
        monitors_per_host=int(number(reports, "monitors_per_host", 2)),
    )
    tick = number(service, "tick_interval_s", 1.0)
    if tick <= 0:
        raise ConfigError(f"rctcb.tick_interval_s must be positive, not {tick}")
    agents: dict[str, Any] = data.get("agents", {})
    limits: dict[str, Any] = data.get("placement", {})
    fencing = str(agents.get("fencing", "none"))
    if fencing not in ("netns", "home", "command", "none"):
        raise ConfigError(f"agents.fencing must be netns, home, command or none, not {fencing!r}")
    fence_home = str(agents.get("fence_home", ""))
    if fencing == "home" and "{host}" not in fence_home:
        raise ConfigError("agents.fencing = 'home' needs agents.fence_home with {host} in it")
    command = agents.get("fence_command", [])
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise ConfigError("agents.fence_command must be a list of strings, e.g. ['fence-vm', '{host}', '{vm}']")
    if fencing == "command" and not command:
        raise ConfigError("agents.fencing = 'command' needs agents.fence_command")
    orchestrator = OrchestratorConfig(
        completion_timeout_per_gib_s=number(agents, "completion_timeout_per_gib_s", 60.0),
        completion_timeout_floor_s=number(agents, "completion_timeout_floor_s", 30.0),
        max_attempts=int(number(agents, "max_attempts", 3)),
        fence_timeout_s=number(agents, "fence_timeout_s", 60.0),
        call_timeout_s=number(agents, "call_timeout_s", 30.0),
        progress_wait_s=number(agents, "progress_wait_s", 1.0),
    )
    return ServiceConfig(
        host=host,
        port=port,
        store=str(service.get("store", f"sqlite:///{home / 'rctcb' / 'ivt.sqlite'}")),
        ca=Path(service.get("ca", home / "rctcb" / "ca" / "ca.pem")),
        cert=Path(service.get("cert", home / "rctcb" / "ca" / "issued" / "rctcb" / "cert.pem")),
        key=Path(service.get("key", home / "rctcb" / "ca" / "issued" / "rctcb" / "key.pem")),
        region=region,
        tick_interval_s=tick,
        max_body_bytes=int(number(service, "max_body_bytes", 4 << 20)),
        manifest=str(service.get("manifest", "")),
        agents=bool(agents.get("enabled", True)),
        fencing=fencing,
        fence_netns=str(agents.get("fence_netns", "/run/netns/{host}")),
        fence_home=fence_home,
        fence_command=tuple(command),
        orchestrator=orchestrator,
        # PlacementConfig names the key and what it must be (a whole number) when one is wrong.
        placement=PlacementConfig(**{key: limits[key] for key in _SECTIONS["placement"] if key in limits}),
    )


def load_config(path: Path) -> ServiceConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the configuration {path}: {e.strerror or e}") from e
    return parse_config(text, source=str(path))


class PeerCertProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, plus the verified client certificate in every request's scope.

    On httptools (llhttp, in C) rather than h11 (pure Python): parsing requests was the largest
    part of a report batch's cost beyond judging it (``bench/ingest.py``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return
        tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)], "tls_version": ssl_object.version()}
        inner: ASGIApp = self.app

        async def with_peer(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": tls}}
            await inner(scope, receive, send)

        self.app = with_peer


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on exactly ``host:port`` (port 0: one the kernel picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns TCP_NODELAY on only for sockets that say they are TCP, and
    # without it a response's body waited ~40 ms for a delayed ACK behind its headers.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _clock(tick: Callable[[], Awaitable[object]], interval_s: float) -> None:
    """Let time pass every ``interval_s`` through the app's one clock (which publishes the effects)."""
    while True:
        await asyncio.sleep(interval_s)
        await tick()


def _agents(config: ServiceConfig, region: Region) -> AgentDirectory:
    """How the orchestrator reaches each host's agent: HTTPS to the address in its IVT row, with
    the RC-TCB's own certificate; fencing out of band as configured."""
    if not config.agents:
        return NoAgents()
    from smig.rctcb.agent_http import CommandFencer, Fencer, HomeFencer, HttpAgentDirectory, NetnsFencer
    from smig.rctcb.ca import client_ssl_context

    fencer: Fencer | None = None
    if config.fencing == "netns":
        fencer = NetnsFencer(lambda host: config.fence_netns.format(host=host))
    elif config.fencing == "home":
        fencer = HomeFencer(lambda host: config.fence_home.format(host=host))
    elif config.fencing == "command":
        fencer = CommandFencer(config.fence_command)
    context = client_ssl_context(config.cert, config.key, config.ca)

    def address_of(host: str) -> str:
        row = region.rows().get(host)
        if row is None or not row.address:
            raise HypervisorError(f"host {host!r} has no agent address in the IVT", host=host)
        return row.address

    return HttpAgentDirectory(address_of, context, fencer, timeout_s=config.orchestrator.call_timeout_s)


def mutual_tls_config(app: Any, context: ssl.SSLContext) -> uvicorn.Config:
    """uvicorn's settings for a service behind mutual TLS (the RC-TCB, an agent's orders API):
    the client certificate in each request's scope, no logging of its own, no lifespan events."""
    return uvicorn.Config(
        app,
        http=PeerCertProtocol,
        ssl_context_factory=lambda _config, _default: context,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        # Agents batch reports over several rounds, and the RC-TCB polls its agents every fraction
        # of a second: keep their TLS sessions across that.
        timeout_keep_alive=75,
    )


class NotifyingServer(uvicorn.Server):
    """uvicorn's server, telling when it has started listening."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()


class _Server(NotifyingServer):
    """The service's server: SIGTERM and SIGINT stop it cleanly."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # SIGTERM and SIGINT are how an operator stops the service: shut down cleanly and exit 0,
        # instead of uvicorn's re-raising the signal once it has shut down.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a background task of the RC-TCB stopped: %s", task.exception())


async def serve(config: ServiceConfig, *, ready: Callable[[str, int], None] | None = None) -> None:
    """Run the service until cancelled or signalled (SIGINT/SIGTERM stop it cleanly)."""
    from smig.rctcb.api import create_app
    from smig.rctcb.ca import server_ssl_context

    try:
        ca_cert = x509.load_pem_x509_certificate(config.ca.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the region CA certificate {config.ca}: {e} (run `smig ca init`)") from e
    context = server_ssl_context(config.cert, config.key, config.ca)
    # Ask for a client certificate but let a connection without one through, so the API can
    # answer it with a 401 and an audit entry instead of a bare TLS alert. A certificate that is
    # presented is still verified against the region CA during the handshake.
    context.verify_mode = ssl.CERT_OPTIONAL
    store = open_store(config.store)
    try:
        region = Region(store, config.region)
        app = create_app(
            region, ca_cert=ca_cert, max_body_bytes=config.max_body_bytes, default_manifest=config.manifest
        )
        placement = dataclasses.replace(config.placement, freshness_s=config.region.policy.freshness_s)
        orchestrator = Orchestrator(
            region, _agents(config, region), placement=placement, config=config.orchestrator, clock=time.time
        )
        evacuations = Evacuations(orchestrator, app.state.events.send)
        app.state.cancel_order = orchestrator.cancel
        app.state.effect_hooks.append(evacuations.on_effects)
        sock = _bind(config.host, config.port)
        uv = mutual_tls_config(app, context)
        port = sock.getsockname()[1]
        server = _Server(uv, lambda: ready(config.host, port) if ready is not None else None)
        clock = asyncio.create_task(_clock(app.state.tick, config.tick_interval_s))
        clock.add_done_callback(_report_crash)
        driving = asyncio.create_task(evacuations.run())
        driving.add_done_callback(_report_crash)
        try:
            await server.serve(sockets=[sock])
        finally:
            clock.cancel()
            driving.cancel()
            sock.close()
    finally:
        store.close()
