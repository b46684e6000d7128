"""The ptrace lab attack: a live process gains an anonymous executable region, keeps working, loses it again.

Targets are real processes: a Python child that answers lines on a pipe (asleep in ``read``), and a
``qemu-system-x86_64`` asleep in ``ppoll`` whose QMP monitor must still answer afterwards.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from smig.errors import AttackError
from smig.lab import ptrace

_ECHO = """
import signal, sys
signal.signal(signal.SIGUSR1, lambda *_: print("usr1", flush=True))
for line in sys.stdin:
    print("echo", line, end="", flush=True)
"""

_TRACER = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:
    sys.exit(f"seize failed: errno {ctypes.get_errno()}")
print("tracing", flush=True)
sys.stdin.read()
"""

_SYS_GETPID = 39
_SYS_PPOLL = 271
_SYS_READ = 0
_PAGE = 4096


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    perms: str
    inode: int
    path: str


def regions(pid: int) -> dict[int, Region]:
    """The mappings of ``pid`` by start address, as /proc/PID/maps shows them."""
    out = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        out[start] = Region(start, end, fields[1], int(fields[4]), fields[5] if len(fields) > 5 else "")
    return out


def read_memory(pid: int, address: int, length: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(address)
        return mem.read(length)


def tracer_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError("no TracerPid line")


def blocked_in(pid: int, timeout_s: float = 2.0) -> int:
    """The system call ``pid`` sleeps in, waiting briefly for it to go back to sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        first = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        if first.lstrip("-").isdigit() and int(first) >= 0:
            return int(first)
        assert time.monotonic() < deadline, f"process {pid} never blocked in a system call ({first})"
        time.sleep(0.01)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` by PID and reap it, killing it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class Echo:
    """A Python child that answers each line on its stdin with ``echo <line>``."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = self.proc.pid

    def ask(self, text: str, timeout_s: float = 5.0) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self.answer(timeout_s)

    def answer(self, timeout_s: float = 5.0) -> str:
        """The child's next line of output."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        assert ready, f"the child said nothing within {timeout_s}s"
        return self.proc.stdout.readline().decode().rstrip("\n")


@pytest.fixture
def echo() -> Iterator[Echo]:
    child = Echo()
    try:
        assert child.ask("hello") == "echo hello"
        yield child
    finally:
        stop(child.proc)


class Qemu:
    """A bare ``qemu-system-x86_64`` (no machine, paused) with a QMP socket in its own temp dir."""

    def __init__(self, workdir: Path) -> None:
        self.socket = workdir / "qmp.sock"
        argv = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S"]
        argv += ["-qmp", f"unix:{self.socket},server=on,wait=off"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=workdir)
        self.pid = self.proc.pid

    def status(self, timeout_s: float = 5.0) -> dict[str, object]:
        """The answer of ``query-status``, over a fresh QMP connection."""
        deadline = time.monotonic() + timeout_s
        while not self.socket.exists():
            assert self.proc.poll() is None, "QEMU exited"
            assert time.monotonic() < deadline, "QEMU never created its QMP socket"
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(timeout_s)
            conn.connect(str(self.socket))
            with conn.makefile("rwb") as stream:
                assert "QMP" in json.loads(stream.readline())
                for command in ("qmp_capabilities", "query-status"):
                    stream.write(json.dumps({"execute": command}).encode() + b"\n")
                    stream.flush()
                    while "return" not in (reply := json.loads(stream.readline())):
                        assert "event" in reply, reply
                result = reply["return"]
                assert isinstance(result, dict)
                return result


@pytest.fixture
def qemu() -> Iterator[Qemu]:
    workdir = Path(tempfile.mkdtemp(prefix="smig-pt"))
    try:
        vm = Qemu(workdir)
        try:
            assert vm.status()["status"] == "prelaunch"
            yield vm
        finally:
            stop(vm.proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_python_child_gains_an_exec_region_keeps_answering_and_loses_it_again(echo: Echo) -> None:
    assert blocked_in(echo.pid) == _SYS_READ
    fill = b"\xcc" * 8 + b"\x90\xc3"

    address = ptrace.map_anonymous_exec(echo.pid, 3 * _PAGE, fill)

    region = regions(echo.pid)[address]
    assert (region.end - region.start, region.perms, region.inode, region.path) == (3 * _PAGE, "rwxp", 0, "")
    assert read_memory(echo.pid, address, len(fill) + 2) == fill + b"\0\0"
    assert tracer_pid(echo.pid) == 0
    assert blocked_in(echo.pid) == _SYS_READ, "the interrupted read was not restarted"
    assert echo.ask("still there?") == "echo still there?"

    ptrace.unmap(echo.pid, address, 3 * _PAGE)

    assert address not in regions(echo.pid)
    assert echo.ask("and now?") == "echo and now?"


@pytest.mark.qemu
def test_qemu_gains_an_exec_region_and_its_monitor_keeps_answering(qemu: Qemu) -> None:
    assert blocked_in(qemu.pid) == _SYS_PPOLL
    threads_before = len(list(Path(f"/proc/{qemu.pid}/task").iterdir()))
    assert threads_before > 1, "expected a multi-threaded QEMU"

    address = ptrace.map_anonymous_exec(qemu.pid, 2 * _PAGE, b"\xcc" * 16)

    region = regions(qemu.pid)[address]
    assert (region.end - region.start, region.perms, region.inode, region.path) == (2 * _PAGE, "rwxp", 0, "")
    assert read_memory(qemu.pid, address, 16) == b"\xcc" * 16
    assert tracer_pid(qemu.pid) == 0
    assert blocked_in(qemu.pid) == _SYS_PPOLL, "the main loop's ppoll was not restarted"
    assert qemu.status() == {"status": "prelaunch", "singlestep": False, "running": False}

    ptrace.unmap(qemu.pid, address, 2 * _PAGE)

    assert address not in regions(qemu.pid)
    assert qemu.status()["status"] == "prelaunch"
    assert len(list(Path(f"/proc/{qemu.pid}/task").iterdir())) == threads_before


@pytest.mark.qemu
def test_qemu_survives_many_attacks_in_a_row(qemu: Qemu) -> None:
    before = regions(qemu.pid)
    for round_ in range(20):
        address = ptrace.map_anonymous_exec(qemu.pid, fill=bytes([round_ + 1]))
        assert read_memory(qemu.pid, address, 1) == bytes([round_ + 1])
        ptrace.unmap(qemu.pid, address, _PAGE)
        assert qemu.status()["status"] == "prelaunch"
    assert regions(qemu.pid).keys() == before.keys()


def test_remote_syscall_runs_in_the_target(echo: Echo) -> None:
    assert ptrace.remote_syscall(echo.pid, _SYS_GETPID) == echo.pid
    assert echo.ask("ok") == "echo ok"


def test_a_failing_remote_syscall_raises_and_leaves_the_process_working(echo: Echo) -> None:
    with pytest.raises(AttackError, match="EINVAL"):
        ptrace.unmap(echo.pid, 1, _PAGE)  # unaligned address
    with pytest.raises(AttackError, match="ENOSYS"):
        ptrace.remote_syscall(echo.pid, 100_000)

    assert tracer_pid(echo.pid) == 0
    assert echo.ask("fine") == "echo fine"


def test_an_error_midway_still_restores_and_detaches(echo: Echo, monkeypatch: pytest.MonkeyPatch) -> None:
    def step_then_fail(self: ptrace._Tracee, insn: int, number: int, args: tuple[int, ...]) -> int:
        real_syscall(self, insn, _SYS_GETPID, ())  # registers are now changed: the thread sits after our syscall
        raise RuntimeError("injected failure")

    real_syscall = ptrace._Tracee.syscall
    monkeypatch.setattr(ptrace._Tracee, "syscall", step_then_fail)

    with pytest.raises(RuntimeError, match="injected failure"):
        ptrace.map_anonymous_exec(echo.pid)

    assert tracer_pid(echo.pid) == 0
    assert blocked_in(echo.pid) == _SYS_READ
    assert echo.ask("unharmed") == "echo unharmed"


def test_a_process_with_another_tracer_is_refused_and_left_alone(echo: Echo) -> None:
    tracer = subprocess.Popen(
        [sys.executable, "-c", _TRACER, str(echo.pid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert tracer.stdout is not None
        assert tracer.stdout.readline() == b"tracing\n"

        with pytest.raises(AttackError, match=f"already traced by PID {tracer.pid}"):
            ptrace.map_anonymous_exec(echo.pid)
    finally:
        stop(tracer)
    assert echo.ask("free again") == "echo free again"


def test_a_dead_pid_raises() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=5)
    with pytest.raises(AttackError, match=f"no process with PID {child.pid}"):
        ptrace.map_anonymous_exec(child.pid)


def test_a_zombie_raises() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 5
        while "State:\tZ" not in Path(f"/proc/{child.pid}/status").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(AttackError, match="zombie"):
            ptrace.remote_syscall(child.pid, _SYS_GETPID)
    finally:
        child.wait(timeout=5)


def test_a_signal_arriving_during_the_attack_is_delivered_after_it(echo: Echo, monkeypatch: pytest.MonkeyPatch) -> None:
    def signal_then_step(self: ptrace._Tracee, insn: int, number: int, args: tuple[int, ...]) -> int:
        os.kill(self.pid, signal.SIGUSR1)  # arrives while the thread is held
        return real_syscall(self, insn, number, args)

    real_syscall = ptrace._Tracee.syscall
    monkeypatch.setattr(ptrace._Tracee, "syscall", signal_then_step)

    address = ptrace.map_anonymous_exec(echo.pid)

    assert echo.answer() == "usr1", "the child's SIGUSR1 handler did not run"
    assert address in regions(echo.pid)
    assert echo.ask("after signal") == "echo after signal"
