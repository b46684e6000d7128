"""The one cross-host test on Xen: two nested Xen hosts on the lab's network, and a guest moved
live from one to the other over it (minutes under TCG: the suite's other migrations stay within
one host)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from smig.errors import MigrationError
from smig.guest.image import GuestImage
from smig.hypervisor.migration import live_migrate
from smig.hypervisor.xen import XenConfig, XenDriver
from smig.lab import net, xen_host
from smig.lab.xen_host import XenHost, XenHostSpec
from smig.lab.xen_image import XenHostImage
from smig.lab.xen_net import attach_nested_host, mac_of
from smig.model import MigrationParams, VMSpec, VMState

pytestmark = pytest.mark.qemu


@pytest.fixture
def two_hosts(
    xen_image: XenHostImage, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[tuple[XenHost, net.Node], tuple[XenHost, net.Node]]]:
    ok, why = net.available()
    if not ok:
        pytest.fail(f"the lab's network cannot be made here: {why}")
    network = net.plan_network("xt", ["x1", "x2"], subnet="10.79.0.0/24")
    net.reclaim("xt")
    net.create(network)
    images = guest_image.kernel.parent.parent
    hosts: list[XenHost] = []
    try:
        specs = []
        for name in ("x1", "x2"):
            node = network.hosts[name]
            tap = attach_nested_host(node)
            specs.append(
                (
                    XenHostSpec(
                        name,
                        tmp_path_factory.mktemp(name),
                        ip=node.cidr,
                        tap=tap,
                        mac=mac_of(node),
                        shares=((images, str(images)),),
                        memory_mib=1024,
                        dom0_mib=512,
                    ),
                    node,
                )
            )

        async def boot_all() -> list[XenHost]:
            return list(await asyncio.gather(*(xen_host.boot(xen_image, s, netns=n.netns) for s, n in specs)))

        hosts = asyncio.run(boot_all())
        yield (hosts[0], specs[0][1]), (hosts[1], specs[1][1])
    finally:
        for h in hosts:
            asyncio.run(xen_host.stop(h))
        net.reclaim("xt")


@pytest.mark.timeout(1200)
def test_a_guest_moves_live_between_two_nested_xen_hosts(
    two_hosts: tuple[tuple[XenHost, net.Node], tuple[XenHost, net.Node]], guest_image: GuestImage
) -> None:
    (h1, n1), (h2, n2) = two_hosts

    def driver(host: XenHost, node: net.Node) -> XenDriver:
        kernel, initrd = str(guest_image.kernel), str(guest_image.initrd)
        return XenDriver(host.channel, XenConfig(kernel=kernel, initrd=initrd, migration_address=node.address))

    source, target = driver(h1, n1), driver(h2, n2)
    spec = VMSpec(name="far", memory_mib=96, working_set_mib=16, heartbeat_ms=200)

    async def story() -> None:
        info = await source.launch(spec)
        before = (await source.status("far")).heartbeat
        assert before is not None
        try:
            stats = await live_migrate(source, target, "far", MigrationParams())
        except MigrationError:
            # Nested Xen's migrations fail now and then, xl resuming the guest at its source
            # (docs/XEN.md): it must be there, once, and a second attempt must succeed.
            assert [i.name for i in await source.list()] == ["far"] and await target.list() == []
            stats = await live_migrate(source, target, "far", MigrationParams())
        assert stats.uri == f"tcp:{n2.address}:{stats.uri.rsplit(':', 1)[1]}"  # over the lab's network
        assert stats.source_pid == info.pid
        assert await source.list() == []
        moved = await target.status("far")
        assert moved.info.state is VMState.RUNNING
        for _ in range(120):
            hb = (await target.status("far")).heartbeat
            if hb is not None and hb.counter > before.counter + 1:
                break
            await asyncio.sleep(0.5)
        assert hb is not None and hb.boot_id == before.boot_id, "the guest was rebooted, not migrated"
        assert hb.counter > before.counter + 1, "the guest does not run on its new host"
        await target.stop("far")

    asyncio.run(story())
