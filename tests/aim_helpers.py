"""Helpers for AIM tests: a cheap real QEMU process to measure and attack."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from smig.aim import procfs


@contextlib.contextmanager
def bare_qemu(
    home: Path, binary: str = "qemu-system-x86_64", env: Mapping[str, str] | None = None, *, netns: str | None = None
) -> Iterator[int]:
    """A real QEMU process with every code mapping a VM's has (TCG included), but no guest.

    Its command line names ``home`` so the session's leftover check finds it.
    """
    home.mkdir(parents=True, exist_ok=True)
    argv = [binary, "-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-m", "64"]
    argv += ["-pidfile", str(home / f"bare-{time.monotonic_ns()}.pid")]
    if binary != "qemu-system-x86_64":  # a relocated QEMU looks for firmware beside itself
        argv += ["-L", "/usr/share/seabios", "-L", "/usr/share/qemu"]
    if netns is not None:  # the lab's notion of a host: a network namespace
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    try:
        deadline = time.monotonic() + 10
        while not procfs.uses_tcg(procfs.read_maps(proc.pid)):
            assert proc.poll() is None, f"QEMU exited with {proc.returncode}"
            assert time.monotonic() < deadline, "QEMU did not load its TCG accelerator"
            time.sleep(0.05)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
