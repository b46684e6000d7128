"""The agent's order executor on real QEMU: two drivers with their own homes on this machine are two
hosts. A VM moves from one to the other by order ids, over TLS with the region CA's certificates;
every order repeats safely, a restarted agent picks up where the last one stopped, and whatever
goes wrong the VM runs in exactly one place."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from smig.agent.executor import OrderExecutor, migration_tls_dir
from smig.errors import ConfigError, DestinationUnreachable, HypervisorError, TLSError, VMExists, VMNotFound
from smig.guest.image import GuestImage
from smig.hypervisor import process
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.hypervisor.qemu_files import VMFiles
from smig.hypervisor.qemu_migration import TLS_IN
from smig.hypervisor.qmp import session
from smig.model import MigrationParams, PlacedVM, Resources, TLSConfig, VMSpec
from smig.paths import smig_cache
from smig.rctcb.agents import MigrationPhase, MigrationView, VMWhere
from smig.rctcb.ca import Role, init_ca, issue_identity
from tests.helpers import qemu_pids, rising_heartbeat

pytestmark = pytest.mark.qemu

SPEC = VMSpec(name="mover", memory_mib=128, working_set_mib=32)


def placed(spec: VMSpec = SPEC, host: str = "host-a") -> PlacedVM:
    return PlacedVM(spec.name, host, Resources(spec.vcpus, spec.memory_mib), spec=json.dumps(dataclasses.asdict(spec)))


@dataclass
class Host:
    """One lab host on this machine: its home, its QEMU driver, its agent's journal and credentials."""

    name: str
    home: Path
    tls: TLSConfig

    @property
    def state(self) -> Path:
        return self.home / "agent"

    def driver(self) -> QemuDriver:
        return QemuDriver(QemuConfig(home=self.home, cache=smig_cache(), tls=self.tls))

    def pids(self) -> list[int]:
        return qemu_pids(str(self.home / "vms"))


def make_hosts(root: Path, names: tuple[str, ...] = ("host-a", "host-b")) -> list[Host]:
    """Hosts under ``root``, each with an agent identity from one region CA (valid for 127.0.0.1)
    laid out for QEMU's migration TLS."""
    ca = root / "ca"
    init_ca(ca, "lab")
    hosts = []
    for name in names:
        files = issue_identity(ca, name, Role.AGENT, ips=["127.0.0.1"])
        tls = migration_tls_dir(files.cert, files.key, files.ca, root / name / "tls", "127.0.0.1")
        hosts.append(Host(name, root / name, tls))
    return hosts


def stop_hosts(hosts: list[Host]) -> None:
    """Stop every VM of every host; fail if a QEMU survives that (an incoming slot left behind)."""
    for host in hosts:
        driver = host.driver()
        for info in asyncio.run(driver.list()):
            asyncio.run(driver.stop(info.name))
    leftovers = [pid for h in hosts for pid in h.pids()]
    for pid in leftovers:
        asyncio.run(process.terminate(pid, "/vms/"))
    assert not leftovers, f"QEMU processes survived their VMs: {leftovers}"


@pytest.fixture
def hosts(home: Path, guest_image: GuestImage) -> Iterator[list[Host]]:
    made = make_hosts(home)
    yield made
    stop_hosts(made)


async def until_settled(executor: OrderExecutor, vm: str, order_id: str, timeout_s: float = 60.0) -> MigrationView:
    """Poll ``progress`` as the RC-TCB does until the migration is no longer active."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = await executor.progress(vm, order_id)
        if view.status is not MigrationPhase.ACTIVE:
            return view
        assert time.monotonic() < deadline, f"{vm} still migrating after {timeout_s}s: {view}"
        await asyncio.sleep(0.1)


async def until_sent(executor: OrderExecutor, vm: str, order_id: str, nbytes: int) -> None:
    while (view := await executor.progress(vm, order_id)).transferred_bytes < nbytes:
        assert view.status is MigrationPhase.ACTIVE, view
        await asyncio.sleep(0.05)


def test_a_vm_moves_over_tls_by_order_and_every_order_repeats_safely(hosts: list[Host]) -> None:
    a, b = hosts

    async def story() -> None:
        a_driver, b_driver = a.driver(), b.driver()
        on_a, on_b = OrderExecutor(a_driver, a.state, tls=a.tls), OrderExecutor(b_driver, b.state, tls=b.tls)
        async with on_a, on_b:
            info = await a_driver.launch(SPEC)
            before = await rising_heartbeat(a_driver, "mover")
            assert (await on_a.where("mover"), await on_b.where("mover")) == (VMWhere.RUNNING, VMWhere.ABSENT)

            address = await on_b.prepare_incoming(placed(), "o1.1")
            assert json.loads(address)["tls"] == "127.0.0.1", "the target must listen with TLS"
            assert await on_b.prepare_incoming(placed(), "o1.1") == address, "a repeat must not open a second slot"
            assert len(b.pids()) == 1 and await on_b.where("mover") is VMWhere.INCOMING

            await on_a.migrate("mover", address, "o1.1")
            await on_a.migrate("mover", address, "o1.1")  # the RC-TCB re-issues after a crash: a no-op
            # Long polls see the migration to its end: the RC-TCB learns of it when it happens. An
            # answer "active" comes only once the wait is up (a loaded machine may need two).
            for _ in range(6):
                asked = time.monotonic()
                view = await on_a.progress("mover", "o1.1", wait_s=10)
                if view.status is not MigrationPhase.ACTIVE:
                    break
                assert time.monotonic() - asked >= 9.9, "a long poll answered 'active' before its wait was up"
            assert view.status is MigrationPhase.COMPLETED and view.transferred_bytes > 1 << 20

            assert await on_a.where("mover") is VMWhere.ABSENT
            assert await on_b.where("mover") is VMWhere.RUNNING
            assert a.pids() == [] and len(b.pids()) == 1 and b.pids() != [info.pid]
            after = await rising_heartbeat(b_driver, "mover", after=before.counter)
            assert after.boot_id == before.boot_id, "the guest was rebooted, not migrated"
            arrived = (await b_driver.status("mover")).info
            async with session(VMFiles(b.home).paths("mover", arrived.instance).qmp) as qmp:
                creds = (await qmp.execute("query-migrate-parameters"))["tls-creds"]
                capabilities = {c["capability"]: c["state"] for c in await qmp.execute("query-migrate-capabilities")}
            assert creds == TLS_IN, "the guest must have come in over TLS"
            # The destination told the source when it had loaded the VM: only then was it "completed".
            assert capabilities["return-path"] is True

            # Every order repeated after the fact changes nothing.
            target_pid = b.pids()
            assert await on_b.prepare_incoming(placed(), "o1.1") == address
            await on_a.migrate("mover", address, "o1.1")
            await on_a.cancel("mover", "o1.1")
            await on_b.abort_incoming("mover", "o1.1")
            assert (await on_a.progress("mover", "o1.1")).status is MigrationPhase.COMPLETED
            assert (await on_a.progress("mover", "o9.1")).status is MigrationPhase.NONE
            assert (await on_a.where("mover"), await on_b.where("mover")) == (VMWhere.ABSENT, VMWhere.RUNNING)
            assert a.pids() == [] and b.pids() == target_pid

        # A new agent on host A (new executor, new driver) answers from the journal.
        async with OrderExecutor(a.driver(), a.state, tls=a.tls) as restarted:
            assert (await restarted.progress("mover", "o1.1")).status is MigrationPhase.COMPLETED
            assert await restarted.where("mover") is VMWhere.ABSENT
        journal = json.loads((a.state / "orders.json").read_text())
        assert journal["orders"]["o1.1"]["stage"] == "completed"

    asyncio.run(story())


def test_cancel_abort_and_refusals_leave_the_vm_on_its_source_and_a_cold_restart_boots_it_once(
    hosts: list[Host],
) -> None:
    a, b = hosts

    async def story() -> None:
        a_driver, b_driver = a.driver(), b.driver()
        # 8 MiB/s: a migration of this guest takes several seconds, time to interfere with it.
        slow = OrderExecutor(a_driver, a.state, bandwidth_mibps=8)
        async with slow as on_a, OrderExecutor(b_driver, b.state) as on_b:
            info = await a_driver.launch(SPEC)
            before = await rising_heartbeat(a_driver, "mover")

            # Cancelled half-way: the VM runs on A, B's slot is gone with the migration.
            address = await on_b.prepare_incoming(placed(), "c.1")
            await on_a.migrate("mover", address, "c.1")
            await until_sent(on_a, "mover", "c.1", 2 << 20)
            assert (await on_a.where("mover"), await on_b.where("mover")) == (VMWhere.RUNNING, VMWhere.INCOMING)
            await on_a.cancel("mover", "c.1")
            assert (await on_a.progress("mover", "c.1")).status is MigrationPhase.CANCELLED
            assert (await on_a.where("mover"), await on_b.where("mover")) == (VMWhere.RUNNING, VMWhere.ABSENT)
            assert a.pids() == [info.pid] and b.pids() == []

            # The target's slot aborted under a running migration: it fails, the VM stays on A.
            address = await on_b.prepare_incoming(placed(), "c.2")
            await on_a.migrate("mover", address, "c.2")
            await until_sent(on_a, "mover", "c.2", 2 << 20)
            await on_b.abort_incoming("mover", "c.2")
            assert await on_b.where("mover") is VMWhere.ABSENT and b.pids() == []
            view = await until_settled(on_a, "mover", "c.2")
            assert view.status is MigrationPhase.FAILED and view.error
            assert await on_a.where("mover") is VMWhere.RUNNING and a.pids() == [info.pid]

            # A slot dropped before the source sends: nothing listens, the migration fails at once.
            address = await on_b.prepare_incoming(placed(), "c.3")
            await on_b.abort_incoming("mover", "c.3")
            await on_a.migrate("mover", address, "c.3")
            view = await until_settled(on_a, "mover", "c.3", timeout_s=10)
            assert view.status is MigrationPhase.FAILED and "refused" in (view.error or "").lower()

            # Refusals start nothing.
            with pytest.raises(VMNotFound):
                await on_a.migrate("ghost", address, "c.4")
            with pytest.raises(DestinationUnreachable, match="not an incoming address"):
                await on_a.migrate("mover", "exec:touch /tmp/pwned", "c.5")
            plain = await on_b.prepare_incoming(placed(), "c.6")  # B listens without TLS...
            async with OrderExecutor(a_driver, a.state / "tls", tls=a.tls) as on_a_tls:
                with pytest.raises(TLSError, match="announced no TLS identity"):
                    await on_a_tls.migrate("mover", plain, "c.6")  # ...A sends only over TLS
                assert (await on_a_tls.progress("mover", "c.6")).status is MigrationPhase.NONE
            await on_b.abort_incoming("mover", "c.6")
            with pytest.raises(HypervisorError, match="carries no VM spec"):
                await on_b.prepare_incoming(dataclasses.replace(placed(), spec=""), "c.7")
            mid = await rising_heartbeat(a_driver, "mover", after=before.counter)
            assert mid.boot_id == before.boot_id and a.pids() == [info.pid] and b.pids() == []

            # A is fenced (its QEMU killed out of band); B, prepared as the target, restarts the VM
            # from its disk: a new boot, once, however often the order comes.
            spare = await on_b.prepare_incoming(placed(), "f.1")
            os.kill(info.pid, signal.SIGKILL)
            assert await process.wait_gone(info.pid, 5.0)
            assert await on_a.where("mover") is VMWhere.ABSENT
            # The RC-TCB restarts into the slot it prepared, under the same attempt's order id.
            await on_b.start_from_disk(placed(), "f.1")
            assert await on_b.where("mover") is VMWhere.RUNNING
            [pid] = b.pids()
            booted = await rising_heartbeat(b_driver, "mover")
            assert booted.boot_id != before.boot_id, "a cold restart boots the guest afresh"
            await on_b.start_from_disk(placed(), "f.1")
            with pytest.raises(VMExists):  # the slot is gone, and a VM running here is never received
                await on_b.prepare_incoming(placed(), "f.1")
            assert b.pids() == [pid] and (await b_driver.status("mover")).info.pid == pid
            assert json.loads(spare)["order"] == "f.1"

        # How each order ended, as the journals keep it for the RC-TCB's late questions.
        def stages(host: Host) -> dict[str, str]:
            orders = json.loads((host.state / "orders.json").read_text())["orders"]
            return {k: v["stage"] for k, v in orders.items()}

        assert stages(a) == {"c.1": "cancelled", "c.2": "failed", "c.3": "failed"}
        assert stages(b) == {
            "c.1": "aborted", "c.2": "aborted", "c.3": "aborted", "c.6": "aborted", "f.1": "aborted",
            "f.1+restart": "started",
        }  # fmt: skip

    asyncio.run(story())


_SOURCE_AGENT = """
import asyncio, os, signal, sys
from pathlib import Path
from smig.agent.executor import OrderExecutor
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.hypervisor.qemu_files import VMFiles
from smig.hypervisor.qemu_migration import TLS_IN
from smig.hypervisor.qmp import session
from smig.paths import smig_cache
home, address = Path(sys.argv[1]), sys.argv[2]

async def main():
    driver = QemuDriver(QemuConfig(home=home, cache=smig_cache()))
    executor = OrderExecutor(driver, home / "agent", bandwidth_mibps=16)
    await executor.migrate("mover", address, "r.1")
    os.kill(os.getpid(), signal.SIGKILL)  # the agent dies; QEMU goes on sending

asyncio.run(main())
"""


def test_a_restarted_agent_reattaches_to_a_migration_in_flight_and_finishes_it(hosts: list[Host]) -> None:
    a, b = hosts

    async def story() -> None:
        a_driver, b_driver = a.driver(), b.driver()
        async with OrderExecutor(b_driver, b.state) as on_b:
            info = await a_driver.launch(SPEC)
            before = await rising_heartbeat(a_driver, "mover")
            address = await on_b.prepare_incoming(placed(), "r.1")

            agent = await asyncio.create_subprocess_exec(sys.executable, "-c", _SOURCE_AGENT, str(a.home), address)
            assert await agent.wait() == -signal.SIGKILL

            async with OrderExecutor(a.driver(), a.state) as restarted:
                first = await restarted.progress("mover", "r.1")
                assert first.status is MigrationPhase.ACTIVE, "the migration must still be in flight"
                # Nobody polls: the follower the new executor started finishes the order by itself.
                deadline = time.monotonic() + 60
                while a.pids():
                    assert time.monotonic() < deadline, "the source QEMU was never stopped"
                    await asyncio.sleep(0.1)
                view = await restarted.progress("mover", "r.1")
                assert view.status is MigrationPhase.COMPLETED
                assert await restarted.where("mover") is VMWhere.ABSENT
            assert await on_b.where("mover") is VMWhere.RUNNING
            assert not process.alive(info.pid) and len(b.pids()) == 1
            after = await rising_heartbeat(b_driver, "mover", after=before.counter)
            assert after.boot_id == before.boot_id

    asyncio.run(story())


def test_migration_tls_dir_lays_out_the_agent_identity_and_refuses_what_qemu_would(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    init_ca(ca, "lab")
    agent = issue_identity(ca, "host-a", Role.AGENT, ips=["10.77.0.2"], dns=["host-a"])
    tls = migration_tls_dir(agent.cert, agent.key, agent.ca, tmp_path / "q", "10.77.0.2")
    out = Path(tls.directory)
    assert tls.hostname == "10.77.0.2" and out.stat().st_mode & 0o777 == 0o700
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {
        "ca-cert.pem": 0o644, "server-cert.pem": 0o644, "client-cert.pem": 0o644,
        "server-key.pem": 0o600, "client-key.pem": 0o600, "dh-params.pem": 0o644,
    }  # fmt: skip
    assert (out / "server-cert.pem").read_bytes() == agent.cert.read_bytes()

    with pytest.raises(ConfigError, match=r"does not name '10\.9\.9\.9'"):
        migration_tls_dir(agent.cert, agent.key, agent.ca, tmp_path / "q2", "10.9.9.9")
    operator = issue_identity(ca, "alice", Role.OPERATOR)
    with pytest.raises(ConfigError, match="TLS server and client"):
        migration_tls_dir(operator.cert, operator.key, operator.ca, tmp_path / "q3", "alice")
    with pytest.raises(ConfigError, match="is not the key of"):
        migration_tls_dir(agent.cert, operator.key, agent.ca, tmp_path / "q4", "host-a")
    init_ca(tmp_path / "other", "lab")
    with pytest.raises(ConfigError, match="not issued by the CA"):
        migration_tls_dir(agent.cert, agent.key, tmp_path / "other" / "ca.pem", tmp_path / "q5", "host-a")
    with pytest.raises(ConfigError, match="cannot read"):
        migration_tls_dir(tmp_path / "missing.pem", agent.key, agent.ca, tmp_path / "q6", "host-a")


def test_a_restarted_agent_stops_a_destination_no_order_knows(hosts: list[Host]) -> None:
    # Seen in the lab: an agent SIGKILLed between starting a destination QEMU and journalling it
    # left that QEMU waiting forever. The next agent on the host stops it; journalled slots stay.
    _, b = hosts

    async def story() -> None:
        async with OrderExecutor(b.driver(), b.state, tls=True) as first:
            kept = await first.prepare_incoming(placed(), "k.1")
        # What the killed agent left: a destination started, never journalled.
        stray = await b.driver().prepare_incoming(SPEC, MigrationParams(tls=True))
        assert sorted(b.pids()) == sorted([stray.pid, json.loads(kept)["pid"]])
        async with OrderExecutor(b.driver(), b.state, tls=True) as restarted:
            await restarted.start()
            assert b.pids() == [json.loads(kept)["pid"]], "the stray slot is stopped, the journalled one kept"
            assert await restarted.where("mover") is VMWhere.INCOMING
            await restarted.abort_incoming("mover", "k.1")
        assert b.pids() == []

    asyncio.run(story())
