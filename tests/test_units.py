"""Pure pieces: heartbeat parsing, QEMU's migration replies, the kernel package, the cpio writer."""

from __future__ import annotations

import asyncio
import io
import stat
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from smig.errors import DestinationUnreachable, ImageError, MigrationError, QMPError, TLSError
from smig.guest.cpio import CpioWriter
from smig.guest.image import parse_kernel_dependency
from smig.hypervisor import qmp
from smig.hypervisor.base import Capability
from smig.hypervisor.heartbeat import parse_last
from smig.hypervisor.migration import check_capabilities
from smig.hypervisor.migration_status import classify_failure, progress_from_query
from smig.hypervisor.qemu import QemuDriver
from smig.hypervisor.qemu_argv import InstancePaths, kernel_cmdline, qemu_argv
from smig.model import Accel, MigrationParams, MigrationStatus, VMSpec, valid_vm_name


def test_last_complete_heartbeat_wins_and_partial_lines_are_ignored() -> None:
    text = "SMIG-BOOT b1\nSMIG-HB b1 7 700\nSMIG-HB b1 8 800\nSMIG-HB b1 9 9"
    hb = parse_last(text)
    assert hb is not None and (hb.boot_id, hb.counter, hb.guest_uptime_ms) == ("b1", 8, 800)
    assert parse_last("SMIG-BOOT b1\n") is None
    assert parse_last("garbage\nSMIG-HB b1 x 1\n") is None


def test_progress_from_query_migrate() -> None:
    p = progress_from_query(
        {
            "status": "active",
            "total-time": 420,
            "expected-downtime": 35,
            "ram": {
                "transferred": 100,
                "remaining": 50,
                "total": 268435456,
                "dirty-pages-rate": 10,
                "page-size": 4096,
                "dirty-sync-count": 2,
                "mbps": 900.5,
            },
        }
    )
    assert p.status is MigrationStatus.ACTIVE and p.elapsed_ms == 420 and p.expected_downtime_ms == 35
    assert p.dirty_rate_bytes == 40960 and p.iterations == 2
    assert progress_from_query({"status": "pre-switchover"}).status is MigrationStatus.ACTIVE
    assert progress_from_query({"status": "failed", "error-desc": "x"}).error == "x"


@pytest.mark.parametrize(
    "desc, kind",
    [
        ("Failed to connect socket: Connection refused", DestinationUnreachable),
        ("Failed to connect to '/x/migrate.sock': No such file or directory", DestinationUnreachable),
        ("TLS handshake failed: The certificate is NOT trusted.", TLSError),
        # A path that happens to hold "tls" (a temporary directory's random name) is no TLS failure.
        ("Failed to connect to '/tmp/smig-tlszmh7ut/migrate.sock': Connection refused", DestinationUnreachable),
        ("Certificate does not have key usage digitalSignature", TLSError),
        ("Unable to write to socket: Bad address", MigrationError),
        ("Unable to write to socket: Bad file descriptor", DestinationUnreachable),
        (None, MigrationError),
    ],
)
def test_failures_are_typed(desc: str | None, kind: type[MigrationError]) -> None:
    e = classify_failure(desc, vm="a")
    assert type(e) is kind and e.vm == "a"


def test_kernel_dependency_is_the_versioned_package() -> None:
    out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert parse_kernel_dependency(out) == "linux-image-6.1.0-56-cloud-amd64"
    with pytest.raises(ImageError):
        parse_kernel_dependency("linux-image-cloud-amd64\n")


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos = (pos + namesize + 3) & ~3
        body = data[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body)


def test_cpio_round_trip() -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.directory("bin")
    w.file("init", b"#!/bin/sh\n", 0o755)
    w.symlink("bin/sh", "busybox")
    w.char_device("dev/console", 5, 1)
    w.close()
    got = _read_cpio(buf.getvalue())
    assert got["init"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n")
    assert got["bin/sh"][1] == b"busybox" and stat.S_ISLNK(got["bin/sh"][0])
    assert stat.S_ISCHR(got["dev/console"][0]) and stat.S_ISDIR(got["bin"][0])


def test_source_and_destination_command_lines_differ_only_by_incoming(tmp_path: object) -> None:
    from pathlib import Path

    spec = VMSpec(name="a", memory_mib=256, dirty_mbps=50)
    paths = InstancePaths(Path("/h/vms/a/i1"))
    src = qemu_argv("qemu", spec, Accel.TCG, Path("/k"), Path("/i"), paths)
    dst = qemu_argv("qemu", spec, Accel.TCG, Path("/k"), Path("/i"), paths, incoming=True)
    assert dst[: len(src)] == src and dst[len(src) :] == ["-incoming", "defer"]
    assert "smig_dirty=50" in kernel_cmdline(spec)
    assert "pc-i440fx-7.2,accel=tcg" in src


def test_vm_names_are_plain() -> None:
    assert valid_vm_name("web-1.a_b")
    for bad in ("", "A", "../x", "a/b", "x" * 64, "-a"):
        assert not valid_vm_name(bad)


def test_a_missing_capability_is_refused_as_such_not_as_a_tls_failure() -> None:
    class _NoTLS:
        capabilities = frozenset({Capability.LIVE_MIGRATION, Capability.TCP_TRANSPORT})

    with pytest.raises(MigrationError, match="destination driver cannot do tls-migration") as caught:
        check_capabilities(QemuDriver, _NoTLS, MigrationParams(tls=True))  # type: ignore[arg-type]
    assert type(caught.value) is MigrationError


@pytest.mark.parametrize("failure", [AssertionError(), EOFError(), ConnectionResetError("reset")])
def test_a_qmp_connection_that_breaks_as_it_starts_is_a_typed_error(
    failure: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What qemu.qmp raises when QEMU closes its socket just as the session starts (a QEMU that
    # exits after its migration while an agent lists its VMs); it once escaped and ended the agent.
    async def breaks(self: QMPClient, address: str) -> None:
        raise failure

    monkeypatch.setattr(QMPClient, "connect", breaks)
    with pytest.raises(QMPError, match="cannot reach QEMU's monitor"):
        asyncio.run(qmp.connect(tmp_path / "qmp.sock", vm="v"))
