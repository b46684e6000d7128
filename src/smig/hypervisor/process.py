"""Processes SMIG started: liveness and stopping them, by PID, only when they are ours.

A PID can be reused after its process exits; before signalling, the process's command line is
checked for a marker only SMIG's processes carry (their instance directory).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 3, after the parenthesised command name, is the state.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def is_ours(pid: int, marker: str) -> bool:
    """True if ``pid`` runs and its command line contains ``marker``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline and alive(pid)


async def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``pid`` to exit; True if it did."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while alive(pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def terminate(pid: int, marker: str, *, grace_s: float = 3.0) -> None:
    """Stop ``pid`` if it is ours: SIGTERM, then SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not is_ours(pid, marker):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if await wait_gone(pid, wait):
            return


def read_pidfile(path: Path) -> int | None:
    """The PID in ``path``, or None if the file is missing or empty."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
