"""Lab attack primitive: make a *running* process map anonymous executable memory, and undo it.

For SMIG's integrity-measurement lab only, never for production. An attacker who controls a
hypervisor process can make it map executable memory that no file on disk backs (the first step
of code injection). The AIM monitor has to notice that new ``x`` region. This module makes that
change to a real, live process from the outside, so tests can check that the monitor sees it,
and then removes the region again.

Why ptrace: it is the only interface Linux offers for running a system call *inside* another
process without that process's help. Through ctypes it needs nothing but libc: no gdb, no
compiled helper, no cooperation from the target. Only the thread named by ``pid`` is stopped
(for QEMU, the main thread, which usually sleeps in ``ppoll``). The other threads keep running.

How one :func:`remote_syscall` works:

1. ``PTRACE_SEIZE`` the thread and ``PTRACE_INTERRUPT`` it. No ``SIGSTOP`` is sent, so the other
   threads are not drawn into a group stop.
2. Save its registers (``PTRACE_GETREGS``).
3. Point ``rip`` at a ``syscall`` instruction (``0f 05``) found in the text of a file-backed
   executable mapping (libc first). Load ``rax`` with the number and ``rdi, rsi, rdx, r10, r8, r9``
   with the arguments. Set ``orig_rax = -1`` so the kernel does not take the stop for an
   interrupted call that it must restart.
4. ``PTRACE_SINGLESTEP``: the thread runs that one instruction. The kernel reports a ``SIGTRAP``
   once the call has returned, and ``rax`` holds the result (``-errno`` on failure).
5. Restore the saved registers exactly and ``PTRACE_DETACH``. If the thread was inside a blocking
   call (``ppoll``, ``read``), the saved ``rax`` (``-ERESTART...``) and ``orig_rax`` make the
   kernel restart that call on resume, as if nothing had happened.

Steps 4 and 5 run on every path, errors included. Signals that arrive for the thread while it is
held are taken from it and queued to it again before the detach.

Limits: x86_64 only. Needs ``CAP_SYS_PTRACE`` (root) or a Yama ``ptrace_scope`` that allows it, and
no other tracer on the thread. The kernel ties a tracee to the OS thread that attached, so one
call must run start to end on a single thread (these functions are synchronous; do not spread
one call over several threads).

Every failure raises :class:`smig.errors.AttackError`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import platform
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from smig.errors import AttackError

log = logging.getLogger(__name__)

SYS_MMAP = 9
SYS_MUNMAP = 11

_PTRACE_CONT = 7
_PTRACE_SINGLESTEP = 9
_PTRACE_GETREGS = 12
_PTRACE_SETREGS = 13
_PTRACE_DETACH = 17
_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_PTRACE_EVENT_STOP = 128
_WALL = 0x40000000
_WNOHANG = 1
_SYS_TGKILL = 234

_SYSCALL_INSN = b"\x0f\x05"
_MAX_ERRNO = 4095
_U64 = (1 << 64) - 1
_STOP_TIMEOUT_S = 5.0
_MAX_RESUMES = 32
_CHUNK = 1 << 20

_REG_NAMES = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
    "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip


class _Regs(ctypes.Structure):
    """``struct user_regs_struct`` of x86_64 (``<sys/user.h>``), in kernel order."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in _REG_NAMES]
    r10: int
    r9: int
    r8: int
    rax: int
    rdx: int
    rsi: int
    rdi: int
    orig_rax: int
    rip: int


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    libc.waitpid.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    libc.waitpid.restype = ctypes.c_int
    libc.syscall.restype = ctypes.c_long
    return libc


def _ptrace(request: int, pid: int, data: int | _Regs = 0) -> None:
    """One ptrace request (``addr`` is unused by every request here); raises ``OSError`` with the errno."""
    arg = data if isinstance(data, int) else ctypes.addressof(data)
    if _libc().ptrace(request, pid, None, arg) == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass(frozen=True)
class _Stop:
    """A ptrace-stop as ``waitpid`` reports it."""

    signal: int
    event: int


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    perms: str
    inode: int
    path: str


def _maps(pid: int) -> Iterator[_Mapping]:
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except FileNotFoundError as e:
        raise AttackError(f"no process with PID {pid}: it exited or never existed") from e
    except OSError as e:
        raise AttackError(f"cannot read /proc/{pid}/maps ({e.strerror}); run as root or the same user") from e
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        yield _Mapping(start, end, fields[1], int(fields[4]), fields[5] if len(fields) > 5 else "")


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError as e:
        raise AttackError(f"no process with PID {pid}: it exited or never existed") from e
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _check_target(pid: int) -> None:
    """Refuse early, with a clear reason, what ptrace would refuse with a bare EPERM."""
    if platform.machine() != "x86_64":
        raise AttackError(f"remote system calls are implemented for x86_64 only, not {platform.machine()}")
    if pid <= 0:
        raise AttackError(f"invalid PID {pid}")
    if pid == os.getpid() or Path(f"/proc/self/task/{pid}").exists():
        raise AttackError(f"PID {pid} is this very process; a process cannot ptrace itself")
    status = _status(pid)
    if status.get("State", "").startswith(("Z", "X")):
        raise AttackError(f"process {pid} has exited (zombie); there is nothing left to attack")
    tracer = int(status.get("TracerPid", "0") or 0)
    if tracer:
        raise AttackError(f"process {pid} is already traced by PID {tracer} (a debugger or strace?); detach it first")


def _ptrace_refused_hint(pid: int) -> str:
    hints = []
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    try:
        value = scope.read_text().strip()
    except OSError:
        value = ""
    if value and value != "0":
        hints.append(f"Yama ptrace_scope is {value} (run as root, or `sysctl kernel.yama.ptrace_scope=0`)")
    try:
        tracer = _status(pid).get("TracerPid", "0")
    except AttackError:
        tracer = "0"
    if tracer not in ("", "0"):
        hints.append(f"it is already traced by PID {tracer}")
    if os.geteuid() != 0:
        hints.append("this process is not root and may lack CAP_SYS_PTRACE")
    return "; ".join(hints) or "another tracer, a seccomp/LSM policy, or missing CAP_SYS_PTRACE"


def _read_memory(pid: int, address: int, length: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, length, address)
    finally:
        os.close(fd)


def _write_memory(pid: int, address: int, data: bytes) -> None:
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_WRONLY)
        try:
            written = os.pwrite(fd, data, address)
        finally:
            os.close(fd)
    except OSError as e:
        raise AttackError(f"cannot write {len(data)} bytes at {address:#x} in process {pid}: {e.strerror}") from e
    if written != len(data):
        raise AttackError(f"short write into process {pid} at {address:#x}: {written} of {len(data)} bytes")


def _find_syscall_instruction(pid: int) -> int:
    """Address of a ``syscall`` instruction in a file-backed executable mapping (libc first)."""
    candidates = [m for m in _maps(pid) if "x" in m.perms and m.inode != 0 and m.path.startswith("/")]
    candidates.sort(key=lambda m: "/libc." not in m.path and "/libc-" not in m.path)
    for m in candidates:
        tail = b""
        for offset in range(m.start, m.end, _CHUNK):
            try:
                chunk = tail + _read_memory(pid, offset, min(_CHUNK, m.end - offset))
            except OSError:
                break  # unreadable mapping: try the next
            at = chunk.find(_SYSCALL_INSN)
            if at >= 0:
                log.debug("syscall instruction of %d at %#x in %s", pid, offset - len(tail) + at, m.path)
                return offset - len(tail) + at
            tail = chunk[-1:]
    raise AttackError(
        f"no syscall instruction (0f 05) found in any file-backed executable mapping of process {pid}; "
        "is it a statically linked or stripped-down program with no libc?"
    )


class _Tracee:
    """One thread under our ptrace, from seize to detach, remembering what it must get back."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.attached = False
        self.stopped = False
        self.gone = False
        self.saved: _Regs | None = None
        self.held_signals: list[int] = []

    def seize(self) -> None:
        try:
            _ptrace(_PTRACE_SEIZE, self.pid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise AttackError(f"no process with PID {self.pid}: it exited or never existed") from e
            hint = _ptrace_refused_hint(self.pid)
            raise AttackError(f"ptrace refused for process {self.pid} ({e.strerror}): {hint}") from e
        self.attached = True
        try:
            _ptrace(_PTRACE_INTERRUPT, self.pid)
        except OSError as e:
            raise AttackError(f"cannot interrupt process {self.pid}: {e.strerror}") from e
        while (stop := self._wait()).event != _PTRACE_EVENT_STOP:
            self._hold(stop.signal)  # a signal got there first; the interrupt stop follows it
            self._resume(_PTRACE_CONT)
        self.saved = self.getregs()
        if self.saved.orig_rax != _U64:
            log.debug(
                "process %d stopped in system call %d (rax %#x): it restarts once restored",
                self.pid,
                self.saved.orig_rax,
                self.saved.rax,
            )

    def getregs(self) -> _Regs:
        regs = _Regs()
        try:
            _ptrace(_PTRACE_GETREGS, self.pid, regs)
        except OSError as e:
            raise AttackError(f"cannot read the registers of process {self.pid}: {e.strerror}") from e
        return regs

    def setregs(self, regs: _Regs) -> None:
        try:
            _ptrace(_PTRACE_SETREGS, self.pid, regs)
        except OSError as e:
            raise AttackError(f"cannot set the registers of process {self.pid}: {e.strerror}") from e

    def syscall(self, insn: int, number: int, args: tuple[int, ...]) -> int:
        """Run one system call at ``insn``; the raw 64-bit ``rax`` it returned."""
        assert self.saved is not None
        regs = _Regs.from_buffer_copy(self.saved)
        regs.rip = insn
        regs.rax = number & _U64
        regs.orig_rax = _U64  # -1: not inside a system call, so nothing to restart
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args, strict=False):
            setattr(regs, name, value & _U64)
        self.setregs(regs)
        for _ in range(_MAX_RESUMES):
            self._resume(_PTRACE_SINGLESTEP)
            stop = self._wait()
            if stop.event == _PTRACE_EVENT_STOP:
                continue  # a group stop or a late interrupt; the step is still ahead
            if stop.signal != signal.SIGTRAP:
                self._hold(stop.signal)
                continue
            rip = self.getregs().rip
            if rip == insn + len(_SYSCALL_INSN):
                return self.getregs().rax
            if rip != insn:
                raise AttackError(f"process {self.pid} stopped at {rip:#x} instead of after the syscall at {insn:#x}")
            self._hold(stop.signal)  # someone else's SIGTRAP, taken before our instruction ran
        raise AttackError(f"process {self.pid} kept stopping for signals; the remote system call did not complete")

    def release(self) -> None:
        """Restore the saved registers, give back held signals, detach. Raises AttackError if it cannot."""
        if self.gone or not self.attached:
            return
        if not self.stopped:
            try:
                _ptrace(_PTRACE_INTERRUPT, self.pid)
                while (stop := self._wait()).event != _PTRACE_EVENT_STOP:
                    self._hold(stop.signal)
                    self._resume(_PTRACE_CONT)
            except (OSError, AttackError) as e:
                if self.gone:
                    return
                raise AttackError(f"process {self.pid} could not be stopped to detach; it stays traced: {e}") from e
        restore_error = None
        if self.saved is not None:
            try:
                self.setregs(self.saved)
            except AttackError as e:
                restore_error = e  # still detach: a stopped, traced thread would hang the process
        tgid = self._tgid()
        for sig in self.held_signals:
            if _libc().syscall(_SYS_TGKILL, tgid, self.pid, sig) == -1:
                log.error("could not give signal %d back to process %d", sig, self.pid)
        try:
            _ptrace(_PTRACE_DETACH, self.pid)
        except OSError as e:
            raise AttackError(f"cannot detach from process {self.pid}: {e.strerror}") from e
        self.attached = self.stopped = False
        if restore_error is not None:
            raise restore_error

    def _tgid(self) -> int:
        try:
            return int(_status(self.pid).get("Tgid", self.pid))
        except AttackError:
            return self.pid

    def _hold(self, sig: int) -> None:
        log.debug("holding signal %d of process %d until detach", sig, self.pid)
        self.held_signals.append(sig)

    def _resume(self, request: int) -> None:
        try:
            _ptrace(request, self.pid)
        except OSError as e:
            raise AttackError(f"cannot resume process {self.pid}: {e.strerror}") from e
        self.stopped = False

    def _wait(self) -> _Stop:
        """Wait for the next ptrace-stop, polling so that a thread stuck in the kernel cannot hang us."""
        status = ctypes.c_int()
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        delay = 0.0002
        while True:
            got = _libc().waitpid(self.pid, ctypes.byref(status), _WALL | _WNOHANG)
            if got == -1:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                raise AttackError(f"waiting for process {self.pid} to stop failed: {os.strerror(code)}")
            if got == self.pid:
                if os.WIFSTOPPED(status.value):
                    self.stopped = True
                    return _Stop(os.WSTOPSIG(status.value), (status.value >> 16) & 0xFF)
                self.gone = True
                raise AttackError(f"process {self.pid} exited while it was being attacked (status {status.value:#x})")
            if time.monotonic() > deadline:
                raise AttackError(
                    f"process {self.pid} did not stop within {_STOP_TIMEOUT_S:.0f}s "
                    "(stuck in uninterruptible sleep? see /proc/PID/wchan)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.01)


def remote_syscall(pid: int, number: int, *args: int) -> int:
    """Make thread ``pid`` run system call ``number`` with up to six integer ``args``; return its result.

    The thread is stopped only for the call and resumes exactly where it was (a blocking call it was
    in is restarted). Other threads of the process keep running meanwhile. Negative arguments are
    passed as their two's-complement 64-bit value (``-1`` for an ``fd`` of ``mmap``).

    Raises:
        AttackError: no such process; ptrace refused (Yama, another tracer, no CAP_SYS_PTRACE); no
            ``syscall`` instruction found; the call returned ``-errno``; the thread could not be
            restored and detached.
    """
    if len(args) > 6:
        raise AttackError(f"a system call takes at most 6 arguments, not {len(args)}")
    _check_target(pid)
    insn = _find_syscall_instruction(pid)
    tracee = _Tracee(pid)
    try:
        tracee.seize()
        raw = tracee.syscall(insn, number, args)
    except BaseException:
        try:
            tracee.release()
        except AttackError as e:
            log.error("after a failed remote system call: %s", e)
        raise
    tracee.release()
    result = raw - (1 << 64) if raw >> 63 else raw
    if -_MAX_ERRNO <= result < 0:
        name = errno.errorcode.get(-result, str(-result))
        raise AttackError(f"system call {number} in process {pid} failed: {name} ({os.strerror(-result)})")
    log.info("process %d ran system call %d(%s) -> %#x", pid, number, ", ".join(hex(a) for a in args), result)
    return result


def map_anonymous_exec(pid: int, length: int = 4096, fill: bytes | None = None) -> int:
    """Make process ``pid`` map ``length`` bytes of anonymous ``rwx`` memory; return its address.

    ``fill``, if given, is written at the start of the region (a few ``\\xcc`` bytes make it look like
    code). If that write fails, the region is unmapped again before the error is raised.

    Raises:
        AttackError: a bad ``length`` or ``fill``, or any failure of :func:`remote_syscall`.
    """
    if length <= 0:
        raise AttackError(f"length must be positive, not {length}")
    if fill is not None and len(fill) > length:
        raise AttackError(f"fill of {len(fill)} bytes does not fit into {length} bytes")
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    address = remote_syscall(pid, SYS_MMAP, 0, length, prot, flags, -1, 0)
    if fill:
        try:
            _write_memory(pid, address, fill)
        except AttackError:
            try:
                unmap(pid, address, length)
            except AttackError as e:
                log.error("could not undo the mapping at %#x in process %d: %s", address, pid, e)
            raise
    return address


def unmap(pid: int, address: int, length: int) -> None:
    """Make process ``pid`` unmap ``length`` bytes at ``address`` (undoes :func:`map_anonymous_exec`).

    Raises:
        AttackError: any failure of :func:`remote_syscall` (``EINVAL`` for an unaligned address).
    """
    remote_syscall(pid, SYS_MUNMAP, address, length)
