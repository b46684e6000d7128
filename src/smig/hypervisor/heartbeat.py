"""Reading what a guest says about itself: ``SMIG-HB <boot_id> <counter> <uptime_ms>`` lines.

The guest writes one line every ``heartbeat_ms`` to its second serial port, which QEMU appends
to a file in the VM's instance directory. Only the tail of the file is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from smig.model import Heartbeat

_TAIL = 4096


def parse_last(text: str) -> Heartbeat | None:
    """The last complete heartbeat line in ``text``, or None if it holds none."""
    lines = text.split("\n")
    # The final element is either "" (text ended in a newline) or a line still being written.
    for line in reversed(lines[:-1]):
        parts = line.strip().split()
        if len(parts) == 4 and parts[0] == "SMIG-HB":
            try:
                return Heartbeat(boot_id=parts[1], counter=int(parts[2]), guest_uptime_ms=int(parts[3]))
            except ValueError:
                continue
    return None


def read_last(path: Path) -> Heartbeat | None:
    """The last heartbeat in the file at ``path``, or None if there is none (yet)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL))
            return parse_last(f.read().decode(errors="replace"))
    except FileNotFoundError:
        return None


async def wait_for(
    path: Path | Callable[[], Path], timeout_s: float, *, after: int = -1, poll_s: float = 0.05
) -> Heartbeat | None:
    """Wait until the file holds a heartbeat with a counter above ``after``; None on timeout.

    ``path`` may be a function, asked again at each poll, for a guest that may move meanwhile.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        hb = read_last(path() if callable(path) else path)
        if hb is not None and hb.counter > after:
            return hb
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(poll_s)
