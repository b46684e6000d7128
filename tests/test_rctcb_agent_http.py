"""The orders path over the network: the RC-TCB's HTTP client drives two agents' orders APIs, served
for real with mutual TLS. Only the RC-TCB's certificate gets an order through; the agents' errors
come back as the types the orchestrator acts on; fencing goes round the agent, to a fencer that
kills a VM's processes in the host's network namespace and nowhere else."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from starlette.types import Receive, Scope, Send

from smig.agent.executor import OrderExecutor
from smig.agent.orders_api import create_orders_app, serve_orders
from smig.errors import DestinationUnreachable, HypervisorError, VMExists, VMNotFound
from smig.guest.image import GuestImage
from smig.hypervisor import process
from smig.hypervisor.qemu_argv import InstancePaths, qemu_argv
from smig.model import Accel, PlacedVM, Resources, VMSpec
from smig.rctcb.agent_http import CommandFencer, HttpAgentClient, HttpAgentDirectory, NetnsFencer
from smig.rctcb.agents import MigrationPhase, VMWhere
from smig.rctcb.ca import IssuedFiles, Role, client_ssl_context, init_ca, issue_identity
from tests.helpers import qemu_pids, rising_heartbeat
from tests.test_agent_executor import SPEC, Host, make_hosts, placed, stop_hosts


class Region:
    """A region CA with two agent hosts, the RC-TCB's identity and an operator's."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hosts = make_hosts(root)
        self.ca_dir = root / "ca"
        self.ca_cert = x509.load_pem_x509_certificate((self.ca_dir / "ca.pem").read_bytes())
        self.rctcb = issue_identity(self.ca_dir, "rctcb", Role.RCTCB)
        self.operator = issue_identity(self.ca_dir, "alice", Role.OPERATOR)

    def agent_files(self, host: Host) -> IssuedFiles:
        issued = self.ca_dir / "issued" / host.name
        return IssuedFiles(issued / "cert.pem", issued / "key.pem", self.ca_dir / "ca.pem")

    def context(self, files: IssuedFiles) -> ssl.SSLContext:
        return client_ssl_context(files.cert, files.key, files.ca)


@pytest.fixture
def region(home: Path) -> Iterator[Region]:
    made = Region(home)
    yield made
    stop_hosts(made.hosts)


@contextlib.asynccontextmanager
async def orders_server(region: Region, host: Host, executor: OrderExecutor) -> AsyncIterator[str]:
    """``host``'s orders API on a free port of 127.0.0.1, with its agent certificate; its base URL."""
    files = region.agent_files(host)
    app = create_orders_app(executor, ca_cert=region.ca_cert)
    ports: list[int] = []
    up = asyncio.Event()

    def ready(_host: str, port: int) -> None:
        ports.append(port)
        up.set()

    task = asyncio.create_task(
        serve_orders(app, "127.0.0.1", 0, cert=files.cert, key=files.key, ca=files.ca, ready=ready)
    )
    waiter = asyncio.create_task(up.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()
    try:
        yield f"https://127.0.0.1:{ports[0]}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.qemu
def test_the_rctcb_moves_a_vm_between_two_agents_over_https(region: Region, guest_image: GuestImage) -> None:
    a, b = region.hosts

    async def story() -> None:
        a_driver, b_driver = a.driver(), b.driver()
        on_a, on_b = OrderExecutor(a_driver, a.state, tls=a.tls), OrderExecutor(b_driver, b.state, tls=b.tls)
        async with on_a, on_b, orders_server(region, a, on_a) as url_a, orders_server(region, b, on_b) as url_b:
            urls = {"host-a": url_a, "host-b": url_b}
            agents = HttpAgentDirectory(urls.__getitem__, region.context(region.rctcb), None, timeout_s=30)
            agent_a, agent_b = agents.agent("host-a"), agents.agent("host-b")
            assert agents.agent("host-a") is agent_a, "one client per host and address"

            await a_driver.launch(SPEC)
            before = await rising_heartbeat(a_driver, "mover")
            address = await agent_b.prepare_incoming(placed(), "h.1")
            assert await agent_b.prepare_incoming(placed(), "h.1") == address
            await agent_a.migrate("mover", address, "h.1")
            await agent_a.migrate("mover", address, "h.1")
            for _ in range(6):  # the RC-TCB's long polls, for up to a minute
                asked = time.monotonic()
                view = await agent_a.progress("mover", "h.1", wait_s=10)
                if view.status is not MigrationPhase.ACTIVE:
                    break
                assert time.monotonic() - asked >= 9.9, "a long poll answered 'active' before its wait was up"
            assert view.status is MigrationPhase.COMPLETED and view.transferred_bytes > 0
            assert (await agent_a.where("mover"), await agent_b.where("mover")) == (VMWhere.ABSENT, VMWhere.RUNNING)
            after = await rising_heartbeat(b_driver, "mover", after=before.counter)
            assert after.boot_id == before.boot_id
            assert a.pids() == [] and len(b.pids()) == 1
            assert (await agent_a.progress("mover", "nothing.1")).status is MigrationPhase.NONE

            # The agents' refusals arrive as the exceptions the orchestrator tells apart.
            with pytest.raises(VMNotFound) as not_found:
                await agent_a.migrate("mover", address, "h.2")  # it left A
            assert not_found.value.host == "host-a" and not_found.value.vm == "mover"
            with pytest.raises(DestinationUnreachable, match="not an incoming address"):
                await agent_b.migrate("mover", "tcp:nowhere", "h.3")
            with pytest.raises(VMExists, match="already runs on this host"):
                await agent_b.prepare_incoming(placed(), "h.4")
            with pytest.raises(HypervisorError, match="carries no VM spec"):
                await agent_a.start_from_disk(PlacedVM("other", "host-a", Resources(1, 128)), "h.5")
            with pytest.raises(HypervisorError, match="no fencing configured"):
                await agent_a.fence("mover")
            await agents.aclose()

    asyncio.run(story())


async def _asgi(app: Any, pem: str | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A request to the app itself, as a server that forwards ``pem`` as the client certificate would."""

    async def with_cert(scope: Scope, receive: Receive, send: Send) -> None:
        if pem is not None:
            scope = {**scope, "extensions": {"tls": {"client_cert_chain": [pem]}}}
        await app(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=with_cert), base_url="https://agent") as client:
        return await client.request(method, path, **kwargs)


def test_only_the_rctcb_gets_an_order_through(region: Region, home: Path) -> None:
    a, b = region.hosts
    foreign_ca = home / "foreign"
    init_ca(foreign_ca, "lab")
    impostor = issue_identity(foreign_ca, "rctcb", Role.RCTCB)

    async def story() -> None:
        on_a = OrderExecutor(a.driver(), a.state)
        async with on_a, orders_server(region, a, on_a) as url:
            rctcb = HttpAgentClient(url, region.context(region.rctcb), timeout_s=10, host="host-a")
            assert await rctcb.where("ghost") is VMWhere.ABSENT
            with pytest.raises(VMNotFound):
                await rctcb.migrate("ghost", "{}", "x.1")

            # Region certificates of other roles: the TLS handshake passes, the API refuses.
            for files in (region.operator, region.agent_files(b)):
                other = HttpAgentClient(url, region.context(files), timeout_s=10, host="host-a")
                with pytest.raises(HypervisorError, match=r"refused the RC-TCB's certificate \(wrong-role\)"):
                    await other.migrate("ghost", "{}", "x.2")
                async with httpx.AsyncClient(verify=region.context(files)) as raw:
                    answer = await raw.get(f"{url}/v1/vms/ghost/where")
                assert answer.status_code == 403 and answer.json()["reason"] == "wrong-role"
                await other.aclose()

            # No certificate, or one from another CA: no TLS session at all.
            bare = ssl.create_default_context(cafile=str(region.ca_dir / "ca.pem"))
            foreign = client_ssl_context(impostor.cert, impostor.key, region.ca_dir / "ca.pem")
            for context in (bare, foreign):
                stranger = HttpAgentClient(url, context, timeout_s=10, host="host-a")
                with pytest.raises(HypervisorError, match=f"cannot be reached at {re.escape(url)}"):
                    await stranger.where("ghost")
                await stranger.aclose()
            await rctcb.aclose()

        # The app checks again by itself, before it reads a body: 401 without a certificate, 403
        # for a foreign one or the wrong role, 422 for a bad body from the RC-TCB.
        app = create_orders_app(on_a, ca_cert=region.ca_cert)
        garbage = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        expected = [
            (None, 401, "no-client-certificate"),
            (impostor.cert.read_text(), 403, "foreign-certificate"),
            (region.operator.cert.read_text(), 403, "wrong-role"),
            (region.rctcb.cert.read_text(), 422, "bad-request"),
        ]
        for pem, status, reason in expected:
            answer = await _asgi(app, pem, "PUT", "/v1/orders/x.3/incoming", **garbage)
            assert (answer.status_code, answer.json()["reason"]) == (status, reason), answer.text
        answer = await _asgi(app, region.rctcb.cert.read_text(), "GET", "/v1/orders/x.3/migration?vm=ghost")
        assert answer.status_code == 200 and answer.json()["status"] == "none"

        # Nothing listens at an agent's address: a HypervisorError naming the host and the URL.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"https://127.0.0.1:{s.getsockname()[1]}"
        gone = HttpAgentClient(dead, region.context(region.rctcb), timeout_s=5, host="host-z")
        with pytest.raises(HypervisorError, match=f"agent of host-z cannot be reached at {re.escape(dead)}") as refused:
            await gone.progress("mover", "x.4")
        assert refused.value.host == "host-z"
        await gone.aclose()

    asyncio.run(story())


# -- fencing ------------------------------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"smig-ft-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=True, capture_output=True)


def _vm_process(home: Path, name: str, image: GuestImage, netns: str | None) -> int:
    """A QEMU with the driver's command line for VM ``name``, held before its first instruction."""
    paths = InstancePaths(home / "vms" / name / secrets.token_hex(3))
    paths.directory.mkdir(parents=True)
    spec = VMSpec(name=name, memory_mib=64, working_set_mib=16)
    argv = [*qemu_argv("qemu-system-x86_64", spec, Accel.TCG, image.kernel, image.initrd, paths), "-S"]
    subprocess.run(["ip", "netns", "exec", netns, *argv] if netns else argv, check=True, capture_output=True)
    pid = process.read_pidfile(paths.pidfile)
    assert pid is not None and process.alive(pid)
    return pid


@pytest.mark.qemu
def test_fencing_kills_the_vms_processes_in_the_hosts_namespace_only(
    home: Path, netns: str, guest_image: GuestImage
) -> None:
    victim = _vm_process(home / "h", "victim", guest_image, netns)
    neighbour = _vm_process(home / "h", "neighbour", guest_image, netns)
    elsewhere = _vm_process(home / "elsewhere", "victim", guest_image, None)  # same VM name, other namespace

    async def story() -> None:
        paths = {"host-x": f"/run/netns/{netns}"}
        fencer = NetnsFencer(lambda host: paths.get(host, f"/run/netns/smig-ft-none-{host}"))
        # The directory never talks to the agent to fence: nothing even listens at its address.
        agents = HttpAgentDirectory(lambda host: "https://127.0.0.1:9", ssl.create_default_context(), fencer)
        await agents.agent("host-x").fence("victim")
        assert not process.alive(victim)
        assert process.alive(neighbour) and process.alive(elsewhere)
        await agents.agent("host-x").fence("victim")  # nothing left to kill: still a success
        with pytest.raises(HypervisorError, match="cannot be read"):
            await fencer.fence("host-y", "victim")
        await agents.aclose()

    try:
        asyncio.run(story())
    finally:
        for pid in qemu_pids(str(home)):
            asyncio.run(process.terminate(pid, str(home)))
        shutil.rmtree(home / "h", ignore_errors=True)
        shutil.rmtree(home / "elsewhere", ignore_errors=True)


def test_a_fencing_command_gets_host_and_vm_and_its_failures_are_errors(tmp_path: Path) -> None:
    out = tmp_path / "fenced"

    async def story() -> None:
        await CommandFencer(["sh", "-c", f"echo {{host}} {{vm}} >> {out}"]).fence("host-x", "victim")
        assert out.read_text() == "host-x victim\n"
        with pytest.raises(HypervisorError, match="exited with 3: BMC says no"):
            await CommandFencer(["sh", "-c", "echo BMC says no >&2; exit 3"]).fence("host-x", "victim")
        with pytest.raises(HypervisorError, match=r"did not finish within 0\.2s"):
            await CommandFencer(["sleep", "5"], timeout_s=0.2).fence("host-x", "victim")
        with pytest.raises(HypervisorError, match="cannot run the fencing command"):
            await CommandFencer([str(tmp_path / "no-such-script")]).fence("host-x", "victim")
        with pytest.raises(HypervisorError, match="not a valid VM name"):
            await CommandFencer(["true"]).fence("host-x", "victim; reboot")

    asyncio.run(story())
