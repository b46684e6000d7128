"""A real QEMU process without a guest: every code mapping a VM's QEMU has, its TCG buffer
included, in a fraction of a second. What the AIM tests and benchmarks measure and attack."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

from smig.aim import procfs
from smig.errors import LaunchError, ProcessGone

BARE_ARGS = ("-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-m", "64")
DEFAULT_BINARY = "qemu-system-x86_64"
# A QEMU copied elsewhere looks for its firmware beside itself; point it at the installed one.
FIRMWARE_DIRS = ("-L", "/usr/share/seabios", "-L", "/usr/share/qemu")


def _settled(maps: list[procfs.MemoryMapping]) -> bool:
    return procfs.uses_tcg(maps) and any(m.anonymous and m.perms.startswith("rwx") for m in maps)


@contextmanager
def bare_qemu(
    *,
    binary: str = DEFAULT_BINARY,
    env: Mapping[str, str] | None = None,
    netns: str | None = None,
    marker_dir: Path | None = None,
    timeout_s: float = 15.0,
) -> Iterator[int]:
    """Start QEMU stopped before the guest's first instruction (``-S``); yield its PID once its code
    mappings have settled; stop it.

    ``netns`` starts it in that network namespace (the lab's notion of a host); ``marker_dir``
    puts a pidfile there, so a search by command line for that directory finds the process.

    Raises:
        LaunchError: QEMU exited, or its mappings did not settle within ``timeout_s``.
    """
    argv = [binary, *BARE_ARGS]
    if binary != DEFAULT_BINARY:
        argv += FIRMWARE_DIRS
    if marker_dir is not None:
        marker_dir.mkdir(parents=True, exist_ok=True)
        argv += ["-pidfile", str(marker_dir / f"bare-{time.monotonic_ns()}.pid")]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **env} if env else None,
    )
    try:
        deadline = time.monotonic() + timeout_s
        maps: list[procfs.MemoryMapping] | None = None
        while True:
            time.sleep(0.05)
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise LaunchError(f"bare QEMU exited with {proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                raise LaunchError(f"bare QEMU did not settle its code mappings within {timeout_s:.0f} s")
            with suppress(ProcessGone):
                now = procfs.executable_mappings(proc.pid)
                if now == maps and _settled(now):
                    break
                maps = now
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
