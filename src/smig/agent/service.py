"""``smig agent run``: the per-host daemon, all its parts under one event loop.

- **Enrolment.** On start, and again whenever the RC-TCB comes back after being away, the agent
  enrols its host or re-syncs with the row the operator enrolled (same key, its address and
  capacity). It keeps trying while the RC-TCB is unreachable.
- **Orders.** The RC-TCB's orders (prepare an incoming VM, migrate out over TLS, progress, cancel,
  cold restart) arrive over HTTPS with mutual TLS on the one configured address, and are carried
  out by :class:`~smig.agent.executor.OrderExecutor`, whose journal survives a restart: a restarted
  agent re-attaches to migrations in flight and answers for orders it already finished.
- **Monitors.** The subjects the RC-TCB assigns this host are measured and reported
  (:class:`~smig.agent.monitoring.MonitorRunner`).
- **Inventory.** Every ``inventory_interval_s`` the agent tells the RC-TCB which VMs run here.

Nothing here decides anything about trust: the RC-TCB does. SIGTERM or SIGINT stops the agent
cleanly (exit 0); its VMs keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from cryptography import x509

from smig.agent.config import AgentConfig
from smig.agent.drivers import executor_waits, make_driver
from smig.agent.executor import OrderExecutor, migration_tls_dir
from smig.agent.monitoring import MonitorRunner
from smig.agent.orders_api import create_orders_app, serve_orders
from smig.agent.rctcb_client import RctcbClient, RctcbRefused, RctcbUnavailable
from smig.aim import reference
from smig.aim.keys import load_private_key, public_key_pem
from smig.aim.measure import Measurer
from smig.aim.monitor import Monitor
from smig.aim.schedule import Schedule
from smig.aim.xen_measure import approved_dom0, approved_xen_syms, xen_subject_found
from smig.errors import ConfigError, SmigError
from smig.model import VMState
from smig.rctcb.ca import client_ssl_context

log = logging.getLogger(__name__)

__all__ = ["Agent", "run_agent"]


class Agent:
    """One host's agent; :meth:`run` until :meth:`stop`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.enrolled = asyncio.Event()
        try:
            self._ca_cert = x509.load_pem_x509_certificate(config.ca.read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the region CA certificate {config.ca}: {e}") from e
        self._signing = load_private_key(config.signing_key)
        tls = None
        if config.migration_tls and config.role == "host":  # a monitor migrates nothing
            tls = migration_tls_dir(
                config.cert, config.key, config.ca, config.home / "agent" / "migration-tls", config.listen_host
            )
        self.driver = make_driver(config, tls)
        self.executor = OrderExecutor(
            self.driver,
            config.home / "agent",
            tls=tls is not None,
            bandwidth_mibps=config.bandwidth_mibps or None,
            downtime_ms=config.downtime_ms,
            waits=executor_waits(config),
        )
        self.client = RctcbClient(config.rctcb, config.host, client_ssl_context(config.cert, config.key, config.ca))
        self.monitors: MonitorRunner | None = None

    def stop(self) -> None:
        self.stopping.set()

    async def run(self, *, ready: Callable[[], None] | None = None) -> None:
        tasks: list[asyncio.Task[object]] = []
        try:
            if self.config.role == "monitor":
                # A Xen host's out-of-band monitor: the agent in its dom0 does the rest.
                await self._run_monitor_role(ready)
                return
            if self.config.ignore_orders:
                # The lab's compromised agent: it never takes an order (nothing answers on its
                # address), so the RC-TCB must fence its VMs out of band.
                log.warning("LAB: this agent ignores the RC-TCB's orders")
                await self._run_without_orders(tasks, ready)
                return
            # Before any order can arrive: a destination started now is never taken for a stray.
            await self.executor.start()
            app = create_orders_app(self.executor, ca_cert=self._ca_cert)
            orders_up = asyncio.Event()
            tasks.append(
                asyncio.create_task(
                    serve_orders(
                        app,
                        self.config.listen_host,
                        self.config.listen_port,
                        cert=self.config.cert,
                        key=self.config.key,
                        ca=self.config.ca,
                        ready=lambda *_: orders_up.set(),
                    ),
                    name="orders",
                )
            )
            await self._first(orders_up.wait(), tasks[0])
            await self._run_without_orders(tasks, ready)
        finally:
            self.stopping.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.executor.close()
            await self.client.close()
            if self.monitors is not None:
                self.monitors.monitor.close()

    async def _run_without_orders(self, tasks: list[asyncio.Task[object]], ready: Callable[[], None] | None) -> None:
        """Enrolment, inventory and monitors, until stopped or one of ``tasks`` fails."""
        tasks.append(asyncio.create_task(self._enrol_loop(), name="enrol"))
        tasks.append(asyncio.create_task(self._inventory_loop(), name="inventory"))
        if self.config.monitoring:
            self.monitors = self._monitors()
            tasks.append(asyncio.create_task(self._run_monitors(self.monitors), name="monitors"))
        if ready is not None:
            ready()
        stopper = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _run_monitor_role(self, ready: Callable[[], None] | None) -> None:
        """Measure the assigned subjects once the host's row exists (the agent in its dom0, or
        the operator, enrols it); no orders, no inventory, no enrolment of its own."""
        while True:
            try:
                await self.client.row(self.config.host)
                break
            except (RctcbUnavailable, RctcbRefused) as e:
                log.info("waiting for %s's row at the RC-TCB: %s", self.config.host, e)
            try:
                await asyncio.wait_for(self.stopping.wait(), 1.0)
                return
            except TimeoutError:
                pass
        self.enrolled.set()
        self.monitors = self._monitors()
        if ready is not None:
            ready()
        await self.monitors.run(self.stopping)

    @staticmethod
    async def _first(waiting: Coroutine[Any, Any, object], task: asyncio.Task[object]) -> None:
        """Wait for ``waiting``, unless ``task`` fails first (the orders server could not bind)."""
        waiter = asyncio.ensure_future(waiting)
        done, _ = await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            waiter.cancel()
            exc = task.exception()
            raise exc if exc is not None else SmigError("the orders server stopped as it started")

    def _monitors(self) -> MonitorRunner:
        trusted = reference.trusted_key(self.config.home, self.config.reference_key)
        manifest = reference.load(self.config.reference, trusted)
        monitor = Monitor(
            self.config.host,
            self._signing,
            Measurer(manifest),
            Schedule(mean_interval_s=self.config.mean_interval_s, jitter=self.config.jitter),
            max_cpu_share=self.config.max_cpu_share,
        )
        monitor.lies = frozenset(self.config.lie_about)
        if monitor.lies:
            log.warning("LAB: this monitor lies about %s", ", ".join(sorted(monitor.lies)))
        subject_of = None
        if self.config.subjects == "xen":
            assert self.config.xen_syms is not None
            syms = approved_xen_syms(manifest, self.config.xen_syms)
            dom0 = None
            if self.config.dom0_kernel is not None:
                dom0 = approved_dom0(manifest, self.config.dom0_kernel, self.config.dom0_tools)
            subject_of = lambda host: xen_subject_found(host, lambda: self.config.hypervisors_of(host), syms, dom0)  # noqa: E731
        return MonitorRunner(
            monitor,
            self.client,
            manifest_digest=reference.manifest_digest(manifest),
            pids_of=self.config.hypervisors_of,
            subject_of=subject_of,
        )

    async def _run_monitors(self, monitors: MonitorRunner) -> None:
        await self.enrolled.wait()
        await monitors.run(self.stopping)

    async def enrol(self) -> dict[str, object]:
        c = self.config
        return await self.client.enrol(
            agent_key=public_key_pem(self._signing.public_key()).decode(),
            address=c.orders_url,
            vcpus=c.capacity_vcpus,
            memory_mib=c.capacity_memory_mib,
            region=c.region,
        )

    async def _enrol_loop(self) -> None:
        """Enrol, then re-sync whenever the RC-TCB was away (a restarted RC-TCB, a broken network)."""
        backoff = 0.2
        while True:
            try:
                row = await self.enrol()
                if not self.enrolled.is_set():
                    log.warning("%s enrolled with the RC-TCB: %s", self.config.host, row.get("state"))
                self.enrolled.set()
                backoff = 0.2
                await self._wait_until_away()
            except RctcbUnavailable as e:
                log.info("the RC-TCB is unreachable, retrying: %s", e)
            except RctcbRefused as e:
                # A refusal is an operator's matter (a new key, no enrolment): say so and keep trying.
                log.error("the RC-TCB refused this agent's enrolment: %s", e)
                backoff = 5.0
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _wait_until_away(self) -> None:
        """Return once the RC-TCB stops answering (checked every few seconds)."""
        while True:
            await asyncio.sleep(3.0)
            try:
                await self.client.row(self.config.host)
            except RctcbUnavailable:
                return
            except RctcbRefused:
                return

    async def _inventory_loop(self) -> None:
        await self.enrolled.wait()
        while True:
            try:
                vms = [vm for vm in await self.driver.list() if vm.state in (VMState.RUNNING, VMState.PAUSED)]
                await self.client.inventory(vms)
            except (RctcbUnavailable, RctcbRefused) as e:
                log.info("inventory not delivered: %s", e)
            except SmigError as e:
                log.warning("cannot list this host's VMs: %s", e)
            except Exception:
                # A report skipped is sent again next period; an agent gone would leave every
                # order on this host to fencing and cold restarts.
                log.exception("listing this host's VMs failed unexpectedly; trying again next period")
            await asyncio.sleep(self.config.inventory_interval_s)


async def run_agent(config: AgentConfig, *, ready: Callable[[], None] | None = None) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, agent.stop)
    await agent.run(ready=ready)
