"""The nested Xen host: its outer QEMU's command line, its image, and a real host booted under TCG."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from smig.aim import reference, xen_syms
from smig.aim.keys import generate_key
from smig.aim.measure import Measurer
from smig.aim.monitor import Monitor, Observation
from smig.aim.report import verify_report
from smig.aim.schedule import Schedule
from smig.aim.xen_dom0 import Dom0Reference
from smig.aim.xen_judge import TEXT_TARGET
from smig.aim.xen_measure import XenMeasurement, measure_xen, xen_subject
from smig.aim.xen_memory import OuterQemu, XenMemoryError
from smig.errors import AttackError, ImageError
from smig.hypervisor.commands import NOT_FOUND, TIMED_OUT
from smig.lab import attacks, xen_attacks
from smig.lab.xen_host import XenHost, XenHostError, XenHostSpec, outer_argv, ready_line
from smig.lab.xen_image import XenHostImage, check_migrating_xen, elf_build_id
from smig.model import Verdict

IMAGE = XenHostImage(
    xen=Path("/c/xen.elf"),
    kernel=Path("/c/vmlinuz"),
    initrd=Path("/c/initrd.img"),
    disk=Path("/c/root.ext4"),
    versions={"xen-hypervisor-4.17-amd64": "4.17.5+72-g01140da4e8-1"},
    digest="d",
)


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_outer_argv_boots_xen_with_dom0_as_its_module() -> None:
    shares = ((Path("/src"), "/src"),)
    spec = XenHostSpec("h1", Path("/run/x/h1"), ip="10.77.0.2/24", gateway="10.77.0.1", shares=shares)
    argv = outer_argv(IMAGE, spec)
    assert _value(argv, "-cpu") == "max,-smap,-smep,-xsave,-avx,-avx2"  # see xen_host.CPU
    assert _value(argv, "-accel") == "tcg"
    assert _value(argv, "-kernel") == "/c/xen.elf"
    kernel_and_args, initrd = _value(argv, "-initrd").split(",")
    assert initrd == "/c/initrd.img"
    assert kernel_and_args.startswith("/c/vmlinuz root=/dev/vda")
    assert "smig.ip=10.77.0.2/24" in kernel_and_args and "smig.gw=10.77.0.1" in kernel_and_args
    assert "smig.mount=smig0:/src" in kernel_and_args
    assert "dom0_mem=768M,max:768M" in _value(argv, "-append")
    assert "local,path=/src,mount_tag=smig0,security_model=none,readonly=on" in argv
    assert _value(argv, "-nic") == "none"  # no network unless the lab gives it a tap
    assert _value(argv, "-qmp") == "unix:/run/x/h1/qmp.sock,server=on,wait=off"
    assert spec.marker in argv


def test_outer_argv_with_a_tap_gives_dom0_its_nic() -> None:
    argv = outer_argv(IMAGE, XenHostSpec("h1", Path("/d"), tap="xt0"))
    assert "tap,id=n0,ifname=xt0,script=no,downscript=no" in argv
    assert "-nic" not in argv


@pytest.mark.parametrize("directory", ["/a,b", "/a b"])
def test_outer_argv_refuses_a_path_qemu_would_split(directory: str) -> None:
    with pytest.raises(XenHostError, match="comma or a space"):
        outer_argv(IMAGE, XenHostSpec("h1", Path(directory)))


def test_outer_argv_refuses_dom0_as_large_as_the_host() -> None:
    with pytest.raises(XenHostError, match="must be smaller"):
        outer_argv(IMAGE, XenHostSpec("h1", Path("/d"), memory_mib=512, dom0_mib=512))


def test_only_a_nested_hosts_qemu_is_taken_for_one() -> None:
    with pytest.raises(XenMemoryError, match="not the outer QEMU"):
        OuterQemu.of(os.getpid())


def test_ready_line() -> None:
    assert ready_line("boot\nsmig-dom0: starting\n") is None
    assert ready_line("x\nsmig-dom0: ready 6.1.0-50-amd64 xen 4.17.5\n") == ("6.1.0-50-amd64", "4.17.5")


def test_only_a_xen_that_migrates_pv_guests_is_accepted() -> None:
    check_migrating_xen("4.17.5+72-g01140da4e8-1")
    with pytest.raises(ImageError, match="shadow paging"):
        check_migrating_xen("4.17.7+13-g2445b30a44-0+deb12u1")
    with pytest.raises(ImageError, match="none"):
        check_migrating_xen("")


# -- a real nested host ----------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_nested_xen_host_runs_the_pinned_xen_and_answers_commands(xen_host_running: XenHost) -> None:
    host = xen_host_running
    assert host.xen_version.startswith("4.17.5")  # what Xen itself says, in dom0's ready line

    async def main() -> None:
        info, listing, missing, slow, fast = await asyncio.gather(
            host.channel.run(["xl", "info"]),
            host.channel.run(["xl", "list"]),
            host.channel.run(["no-such-program"]),
            host.channel.run(["sleep", "5"], timeout_s=1),
            host.channel.run(["cat"], input="through stdin"),
        )
        assert info.ok, info.why()
        pairs = (line.split(":", 1) for line in info.stdout.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in pairs}
        assert fields["xen_version"].startswith("4.17.5")
        assert "virt_caps" in fields
        assert listing.ok and "Domain-0" in listing.stdout
        assert missing.rc == NOT_FOUND
        assert slow.rc == TIMED_OUT  # and the channel still answers the others meanwhile
        assert fast.stdout == "through stdin"
        await host.channel.close()

    asyncio.run(main())


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_aim_reads_xen_from_outside_and_names_a_patched_function(
    xen_host_running: XenHost, xen_image: XenHostImage
) -> None:
    """A healthy Xen matches its package's xen-syms round after round (alternatives and all); a
    byte flipped in its code from outside is found at the function it hit; undone, it matches."""
    host = xen_host_running
    syms = xen_syms.load(xen_image.xen_syms)
    assert syms.build_id and elf_build_id(xen_image.xen) == syms.build_id  # the very Xen that boots
    outer = OuterQemu.of(host.pid)
    assert outer.memory_mib == host.spec.memory_mib and outer.qmp_socket == host.spec.qmp_socket

    async def measure() -> XenMeasurement:
        return await measure_xen(host.pid, outer.memory_mib, outer.qmp_socket, syms)

    async def story() -> None:
        for _ in range(3):
            healthy = await measure()
            assert healthy.verdict is Verdict.MATCH, healthy.mismatches
            assert healthy.bytes == syms.text.size and healthy.text_phys > 0
        record = await xen_attacks.xen_code(host.pid, xen_image.xen_syms, function="do_kexec_op", offset=8)
        try:
            attacked = await measure()
            assert attacked.verdict is Verdict.MISMATCH
            assert [(m.path, m.offset, m.length) for m in attacked.mismatches] == [(TEXT_TARGET, record.offset, 1)]
            assert "do_kexec_op+0x8" in attacked.mismatches[0].reason
        finally:
            assert "restored" in attacks.undo(record)
        assert (await measure()).verdict is Verdict.MATCH

    asyncio.run(story())
    with pytest.raises(AttackError, match="not the outer QEMU"):
        asyncio.run(xen_attacks.xen_code(os.getpid(), xen_image.xen_syms))


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_aim_reads_dom0s_toolstack_from_outside_and_names_a_patched_tool(
    xen_host_running: XenHost, xen_image: XenHostImage
) -> None:
    """dom0's xenstored and xenconsoled are found along dom0's task list and match their package
    files round after round; a byte of xenstored's code flipped from outside is named by file
    offset, in its process; undone, it matches."""
    host = xen_host_running
    syms = xen_syms.load(xen_image.xen_syms)
    dom0 = Dom0Reference.load(xen_image.kernel, xen_image.dom0_tools)
    outer = OuterQemu.of(host.pid)

    async def measure() -> XenMeasurement:
        return await measure_xen(host.pid, outer.memory_mib, outer.qmp_socket, syms, dom0=dom0)

    async def story() -> None:
        for _ in range(3):
            healthy = await measure()
            assert healthy.verdict is Verdict.MATCH, healthy.mismatches
            measured = {t.target.split("[")[0] for t in healthy.targets[1:]}
            assert {"dom0:/usr/lib/xen-4.17/bin/xenstored", "dom0:/usr/lib/xen-4.17/bin/xenconsoled"} <= measured
            assert healthy.bytes > syms.text.size
        record = await xen_attacks.toolstack_code(host.pid, dom0)
        try:
            attacked = await measure()
            assert attacked.verdict is Verdict.MISMATCH
            assert [(m.path, m.offset, m.length) for m in attacked.mismatches] == [
                ("dom0:/usr/lib/xen-4.17/bin/xenstored", record.offset, 1)
            ]
            assert attacked.mismatches[0].pid > 1  # the process in dom0 that runs it
        finally:
            assert "restored" in attacks.undo(record)
        assert (await measure()).verdict is Verdict.MATCH

    asyncio.run(story())
    with pytest.raises(AttackError, match="no reference for 'qemu'"):
        asyncio.run(xen_attacks.toolstack_code(host.pid, dom0, tool="qemu"))


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_a_monitor_signs_reports_on_a_nested_xen_host_that_verify(
    xen_host_running: XenHost, xen_image: XenHostImage
) -> None:
    """The monitor's loop measures a Xen subject like any other: signed reports the RC-TCB's
    verifier accepts, MATCH while healthy, MISMATCH naming the function once Xen is patched."""
    syms = xen_syms.load(xen_image.xen_syms)
    subject = xen_subject("x1", xen_host_running.pid, syms)
    key = generate_key()
    monitor = Monitor("m1", key, Measurer(reference.build([])), Schedule(mean_interval_s=0.2))
    seen: list[Observation] = []
    try:
        asyncio.run(monitor.run(subject, seen.append, rounds=3))
        record = asyncio.run(xen_attacks.xen_code(xen_host_running.pid, xen_image.xen_syms))
        try:
            seen.append(monitor.measure_once(subject))
        finally:
            attacks.undo(record)
        seen.append(monitor.measure_once(subject))
    finally:
        monitor.close()
    last: dict[tuple[str, str], int] = {}
    verdicts = []
    for obs in seen:
        report = verify_report(
            obs.signed,
            keys={"m1": key.public_key()},
            assigned={"x1": ["m1"]},
            last_sequence=last,
            now=obs.report.ended_at,
            max_age_s=60,
            max_skew_s=5,
        )
        last[("m1", "x1")] = report.sequence
        verdicts.append(report.verdict)
    assert verdicts == [Verdict.MATCH] * 3 + [Verdict.MISMATCH, Verdict.MATCH]
    patched = seen[3].report.mismatches
    assert len(patched) == 1 and patched[0].path == TEXT_TARGET and "do_kexec_op+0x8" in patched[0].reason
    assert seen[0].report.root == seen[1].report.root != seen[3].report.root  # healthy rounds agree
