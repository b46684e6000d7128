"""The overhead benchmark's guests: one workload each, and their progress read from the serial log.

A guest boots SMIG's image with ``smig_work=KIND`` on its kernel line; ``smig-guest work`` then
writes ``SMIG-WL <kind> <units> <uptime_ms> <late_us>`` to its second serial port every 250 ms
(cumulative counters, so any window's difference is its progress). The ``disk`` guest gets a
virtio-blk disk, the ``net`` guest a virtio-net NIC on QEMU's user-mode network and a sink on
127.0.0.1 to send to (nothing listens on the host for the guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from smig.errors import BenchError
from smig.guest.image import ImageBuilder
from smig.hypervisor import process
from smig.hypervisor.qemu_argv import InstancePaths, qemu_argv
from smig.model import Accel, VMSpec
from smig.paths import smig_cache

UNITS = {"idle": "ticks/s", "compute": "rounds/s", "disk": "KiB/s", "net": "KiB/s"}
GUEST_MIB = 256
DISK_MIB = 64
TICK_US = 10_000  # the idle workload's timer period
BOOT_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Sample:
    units: int
    guest_ms: int
    late_us: int


class Serial:
    """The guest's ``SMIG-WL`` lines, read from its serial log as they appear."""

    def __init__(self, path: Path, kind: str) -> None:
        self._path = path
        self._kind = kind
        self._offset = 0
        self._partial = b""
        self.samples: list[Sample] = []

    def poll(self) -> None:
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            parts = line.decode(errors="replace").split()
            if len(parts) == 5 and parts[0] == "SMIG-WL" and parts[1] == self._kind:
                try:
                    self.samples.append(Sample(int(parts[2]), int(parts[3]), int(parts[4])))
                except ValueError:
                    continue

    def mark(self) -> int:
        self.poll()
        return len(self.samples)


def score(kind: str, first: Sample, last: Sample) -> float:
    """What a phase achieved between two samples: units per guest second, or for ``idle`` the mean
    wake-up lateness in microseconds per tick."""
    if kind == "idle":
        return (last.late_us - first.late_us) / max(1, last.units - first.units)
    return (last.units - first.units) * 1000.0 / max(1, last.guest_ms - first.guest_ms)


def slowdown_pct(kind: str, on: float, off: float) -> float:
    """How much the guest lost with AIM on (``on``) against off, in percent (see the module)."""
    if kind == "idle":
        return (on - off) / TICK_US * 100.0
    return (1.0 - on / off) * 100.0 if off > 0 else float("nan")


class Sink:
    """A TCP sink on 127.0.0.1 for the ``net`` workload: counts what arrives, in its own thread."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self.received = 0
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="overhead-sink", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buf = bytearray(1 << 20)
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                while True:
                    try:
                        n = conn.recv_into(buf)
                    except OSError:
                        break
                    if n == 0:
                        break
                    self.received += n

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(5)


def guest_argv(
    kind: str, paths: InstancePaths, accel: Accel, *, net_port: int | None = None, binary: str = "qemu-system-x86_64"
) -> list[str]:
    """SMIG's VM command line for a workload guest, with its disk or network device added."""
    image = ImageBuilder(smig_cache()).load()
    spec = VMSpec(name=f"overhead-{kind}", memory_mib=GUEST_MIB, heartbeat_ms=1000)
    argv = qemu_argv(binary, spec, accel, image.kernel, image.initrd, paths)
    words = f" smig_modules=1 smig_work={kind}"
    if kind == "disk":
        disk = paths.directory / "disk.raw"
        with disk.open("wb") as f:
            f.truncate(DISK_MIB << 20)
        argv += ["-drive", f"file={disk},if=none,id=disk0,format=raw", "-device", "virtio-blk-pci,drive=disk0"]
    elif kind == "net":
        if net_port is None:
            raise ValueError("the net workload needs the sink's port")
        words += f" smig_net_port={net_port}"
        # User-mode networking: nothing listens on the host; the guest reaches 127.0.0.1 as 10.0.2.2.
        argv += ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]
    argv[argv.index("-append") + 1] += words
    return argv


@contextlib.asynccontextmanager
async def workload_guest(kind: str, root: Path, accel: Accel) -> AsyncIterator[tuple[int, Serial, Sink | None]]:
    """Boot a guest running ``kind``; yield its QEMU PID, its progress and the net sink; stop it.

    Raises:
        BenchError: QEMU did not start, or the workload reported nothing in time.
    """
    paths = InstancePaths(root / kind)
    paths.directory.mkdir(parents=True)
    sink = Sink() if kind == "net" else None
    pid: int | None = None
    try:
        argv = guest_argv(kind, paths, accel, net_port=sink.port if sink else None)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise BenchError(f"QEMU for the {kind} guest did not start: {err.decode().strip()}")
        pid = process.read_pidfile(paths.pidfile)
        if pid is None:
            raise BenchError(f"QEMU for the {kind} guest wrote no pidfile at {paths.pidfile}")
        serial = Serial(paths.heartbeat, kind)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not serial.mark():
            gone = not process.alive(pid)
            if gone or time.monotonic() > deadline:
                tail = paths.console.read_text(errors="replace")[-400:] if paths.console.exists() else ""
                what = "QEMU exited" if gone else f"no progress within {BOOT_TIMEOUT_S:.0f} s"
                raise BenchError(f"the {kind} guest failed to start its workload ({what}); its console: {tail}")
            await asyncio.sleep(0.2)
        yield pid, serial, sink
    finally:
        if pid is not None:
            await process.terminate(pid, str(paths.directory))
        if sink is not None:
            sink.close()
