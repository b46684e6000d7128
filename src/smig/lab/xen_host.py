"""A nested Xen host: the Xen host image booted in an outer QEMU, and the lab's way into its dom0.

The outer QEMU always runs under TCG: Xen needs ``-cpu max,-smap,-smep`` there (dom0 faults
otherwise; see :data:`CPU`), and this machine's KVM cannot run a nested hypervisor. dom0 is ready about 30 s
after the start. The lab reaches dom0 only through :class:`Dom0Channel`, a virtio-serial port
whose outer end is a Unix socket in the host's directory: nothing listens on any network.

The outer QEMU's process is also what a Xen host's monitors read from outside (its memory is
the nested machine's memory).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import re
import secrets
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smig.aim.xen_memory import OUTER_QEMU_PREFIX
from smig.errors import LaunchError, SmigError
from smig.hypervisor import process
from smig.hypervisor.commands import CommandResult
from smig.lab.xen_image import XenHostImage

QEMU = "qemu-system-x86_64"
READY_RE = re.compile(r"smig-dom0: ready (\S+) xen (\S+)")
BOOT_TIMEOUT_S = 180.0
# -smap,-smep: dom0 page-faults under TCG without. -xsave: with it, dom0's programs crashed or
# computed wrong bytes now and then once a guest ran beside dom0 (xl failing a mutex assertion,
# segfaults, glibc's "corrupted double-linked list", TLS records failing their MAC): the vector
# registers a process had did not survive Xen switching between domains, which it does with
# XSAVE. Without XSAVE, Xen and Linux save them with FXSAVE, and 100 of 100 `xl list` runs beside
# a running guest succeed where 3 of 55 failed with it. XSAVE off takes AVX with it.
CPU = "max,-smap,-smep,-xsave,-avx,-avx2"
EXEC_PORT = "smig.exec"
# QEMU splits -initrd at commas and -drive options at commas: a path holding one cannot be passed.
_UNSAFE = re.compile(r"[,\s]")


class XenHostError(SmigError):
    """A nested Xen host did not start, or its dom0 cannot be reached."""


@dataclass(frozen=True)
class XenHostSpec:
    """One nested Xen host: its name, size, where its files go, and what the lab gives it."""

    name: str
    directory: Path  # its overlay disk, console log, exec socket, pid file
    memory_mib: int = 1536
    dom0_mib: int = 768
    cpus: int = 2
    ip: str | None = None  # dom0's address on eth0, with its prefix length
    gateway: str | None = None
    tap: str | None = None  # the tap interface (in the outer QEMU's network namespace) for eth0
    mac: str = "52:54:00:5e:00:01"
    shares: tuple[tuple[Path, str], ...] = ()  # (directory of the lab machine, where dom0 mounts it)

    @property
    def console(self) -> Path:
        return self.directory / "console.log"

    @property
    def exec_socket(self) -> Path:
        return self.directory / "exec.sock"

    @property
    def qmp_socket(self) -> Path:
        """The outer QEMU's monitor: what a monitor reads the emulated CPU's registers from."""
        return self.directory / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def overlay(self) -> Path:
        return self.directory / "root.qcow2"

    @property
    def marker(self) -> str:
        """What the outer QEMU's command line carries, so only it is ever signalled."""
        return f"{OUTER_QEMU_PREFIX}{self.name}"


def _safe(path: Path | str) -> str:
    text = str(path)
    if _UNSAFE.search(text):
        raise XenHostError(f"QEMU cannot be given the path {text!r}: it holds a comma or a space")
    return text


def outer_argv(image: XenHostImage, spec: XenHostSpec) -> list[str]:
    """The outer QEMU's command line (pure; see the module docstring for why each part)."""
    if spec.dom0_mib >= spec.memory_mib:
        raise XenHostError(f"dom0 ({spec.dom0_mib} MiB) must be smaller than the host ({spec.memory_mib} MiB)")
    dom0_args = [
        f"root=/dev/vda rw console=hvc0 net.ifnames=0 init=/sbin/smig-dom0-init smig.name={spec.name}",
        *([f"smig.ip={spec.ip}"] if spec.ip else []),
        *([f"smig.gw={spec.gateway}"] if spec.gateway else []),
        *(f"smig.mount=smig{i}:{_safe(where)}" for i, (_, where) in enumerate(spec.shares)),
    ]
    xen_args = f"console=com1 com1=115200 dom0_mem={spec.dom0_mib}M,max:{spec.dom0_mib}M dom0_max_vcpus={spec.cpus}"
    argv = [
        QEMU,
        "-name", spec.marker,
        "-machine", "q35", "-accel", "tcg", "-cpu", CPU,
        "-m", str(spec.memory_mib), "-smp", str(spec.cpus),
        "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{_safe(spec.console)}",
        "-kernel", _safe(image.xen), "-append", xen_args,
        "-initrd", f"{_safe(image.kernel)} {' '.join(dom0_args)},{_safe(image.initrd)}",
        "-drive", f"file={_safe(spec.overlay)},if=virtio,format=qcow2",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=exec,path={_safe(spec.exec_socket)},server=on,wait=off",
        "-device", f"virtserialport,chardev=exec,name={EXEC_PORT}",
        "-qmp", f"unix:{_safe(spec.qmp_socket)},server=on,wait=off",
        "-pidfile", _safe(spec.pidfile),
    ]  # fmt: skip
    for i, (source, _) in enumerate(spec.shares):
        argv += ["-virtfs", f"local,path={_safe(source)},mount_tag=smig{i},security_model=none,readonly=on"]
    if spec.tap:
        argv += ["-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no"]
        argv += ["-device", f"virtio-net-pci,netdev=n0,mac={spec.mac}"]
    else:
        argv += ["-nic", "none"]
    return argv


def ready_line(console: str) -> tuple[str, str] | None:
    """(dom0 kernel, Xen version) once dom0's init said it is ready, else None."""
    found = READY_RE.search(console)
    return (found.group(1), found.group(2)) if found else None


class Dom0Channel:
    """Runs commands in a nested host's dom0 through its exec port; a :class:`CommandRunner`.

    Requests are answered out of order, matched by id, so callers may run commands concurrently.
    The connection is a plain socket read by a thread of its own, not an asyncio stream: it
    serves every event loop that uses it, one after another (QEMU's socket accepts one client
    at a time, so a connection left in a finished loop would lock every later one out).
    """

    def __init__(self, socket_path: Path) -> None:
        self._path = socket_path
        # Ids start at random: the answer to a client killed mid-command still comes down the one
        # stream, and must not be taken for the answer to the next client's first request.
        self._ids = itertools.count(secrets.randbits(48))
        self._waiting: dict[int, concurrent.futures.Future[dict[str, object]]] = {}
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # the connection and the table of waiting requests
        self._send = threading.Lock()  # one request written at a time

    def _connect(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(self._path))
                except OSError as e:
                    sock.close()
                    raise XenHostError(f"cannot reach dom0's exec channel at {self._path}: {e}") from e
                self._sock = sock
                threading.Thread(target=self._read, args=(sock,), name="dom0-exec", daemon=True).start()
            return self._sock

    def _read(self, sock: socket.socket) -> None:
        buf = b""
        try:
            while chunk := sock.recv(1 << 16):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._answer(line)
        except OSError:
            pass
        with self._lock:
            if self._sock is sock:
                self._sock = None
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(XenHostError(f"dom0's exec channel at {self._path} closed"))

    def _answer(self, line: bytes) -> None:
        try:
            answer = json.loads(line)
        except ValueError:
            return
        ident = answer.get("id") if isinstance(answer, dict) else None
        with self._lock:
            future = self._waiting.pop(ident, None) if isinstance(ident, int) else None
        if future is not None and not future.done():
            future.set_result(answer)

    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout_s: float = 60.0) -> CommandResult:
        ident = next(self._ids)
        future: concurrent.futures.Future[dict[str, object]] = concurrent.futures.Future()
        request = json.dumps({"id": ident, "argv": list(argv), "input": input, "timeout": timeout_s}) + "\n"
        sock = self._connect()
        with self._lock:
            self._waiting[ident] = future
        try:
            with self._send:
                sock.sendall(request.encode())
            got = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s + 10)
        except OSError as e:
            raise XenHostError(f"dom0's exec channel at {self._path} failed: {e}") from e
        except TimeoutError as e:
            raise XenHostError(f"dom0 did not answer {argv[0]!r} within {timeout_s + 10:g} s") from e
        finally:
            with self._lock:
                self._waiting.pop(ident, None)
        rc, out, err = got.get("rc"), got.get("stdout"), got.get("stderr")
        return CommandResult(tuple(argv), int(rc) if isinstance(rc, int) else -1, str(out or ""), str(err or ""))

    async def __aenter__(self) -> Dom0Channel:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@dataclass
class XenHost:
    """A running nested Xen host."""

    spec: XenHostSpec
    pid: int
    xen_version: str = ""
    dom0_kernel: str = ""
    channel: Dom0Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = Dom0Channel(self.spec.exec_socket)


async def _create_overlay(image: XenHostImage, spec: XenHostSpec) -> None:
    spec.directory.mkdir(parents=True, exist_ok=True)
    spec.overlay.unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.disk), str(spec.overlay),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise XenHostError(f"qemu-img could not create {spec.overlay}: {err.decode().strip()}")


async def boot(
    image: XenHostImage, spec: XenHostSpec, *, netns: str | None = None, timeout_s: float = BOOT_TIMEOUT_S
) -> XenHost:
    """Start the outer QEMU (in ``netns`` if given) and wait until dom0 answers on its channel.

    Raises LaunchError: QEMU exited, or dom0 was not ready within ``timeout_s``; the console log's
    tail is in the message, and the QEMU is stopped.
    """
    await _create_overlay(image, spec)
    for stale in (spec.console, spec.pidfile, spec.exec_socket, spec.qmp_socket):
        stale.unlink(missing_ok=True)
    argv = outer_argv(image, spec)
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    # Not an asyncio child: the host outlives the event loop that booted it (a lab boots its
    # hosts in one loop and drives them from others).
    with (spec.directory / "qemu.log").open("ab") as log_file:
        proc = subprocess.Popen(  # noqa: ASYNC220 (a fork, not a wait)
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True
        )
    host = XenHost(spec, proc.pid)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            if proc.poll() is not None or not process.alive(proc.pid):
                raise LaunchError(f"the outer QEMU of Xen host {spec.name} exited: {_tail(spec)}", host=spec.name)
            found = ready_line(_read(spec.console))
            if found is not None:
                host.dom0_kernel, host.xen_version = found
                break
            if loop.time() >= deadline:
                raise LaunchError(
                    f"dom0 of Xen host {spec.name} was not ready within {timeout_s:g} s: {_tail(spec)}", host=spec.name
                )
            await asyncio.sleep(0.5)
        probe = await host.channel.run(["true"], timeout_s=30)
        if not probe.ok:
            raise LaunchError(f"dom0 of Xen host {spec.name} cannot run commands: {probe.why()}", host=spec.name)
    except BaseException:
        await stop(host)
        raise
    pid = process.read_pidfile(spec.pidfile)
    host.pid = pid or proc.pid
    return host


async def stop(host: XenHost, *, grace_s: float = 20.0) -> None:
    """Power the host off from dom0, and kill its outer QEMU if it does not go in ``grace_s``."""
    with contextlib.suppress(XenHostError, OSError):
        await asyncio.wait_for(host.channel.run(["sh", "-c", "echo o > /proc/sysrq-trigger"], timeout_s=5), 5)
    await host.channel.close()
    if not await process.wait_gone(host.pid, grace_s):
        await process.terminate(host.pid, host.spec.marker)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(spec: XenHostSpec, lines: int = 6) -> str:
    text = _read(spec.console).strip().splitlines() or _read(spec.directory / "qemu.log").strip().splitlines()
    return " | ".join(text[-lines:]) or "(no output)"


def shares_for_code(repo: Path, site_packages: Sequence[Path]) -> tuple[tuple[Path, str], ...]:
    """Read-only shares that give dom0 SMIG's code at the same paths as on the lab machine."""
    return tuple((p, str(p)) for p in (repo, *site_packages))
