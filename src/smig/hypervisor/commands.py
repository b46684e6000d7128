"""Running a host's tools: the one way a driver that shells out (``xl``) reaches its host.

In production the driver runs on the host itself (the agent in Xen's dom0) and uses
:class:`LocalRunner`. In the lab, the same driver can drive a nested host from outside through
the lab's exec channel (:class:`smig.lab.xen_host.Dom0Channel`), which is how the shared driver
suite runs against Xen unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

#: Exit statuses a runner reports for what it could not run (as shells do).
TIMED_OUT = 124
NOT_FOUND = 127


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def why(self) -> str:
        """The last lines the command wrote about its failure, for an error message."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " / ".join(text[-3:]) if text else f"exit status {self.rc}"


class CommandRunner(Protocol):
    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout_s: float = 60.0) -> CommandResult:
        """Run ``argv`` to its end. Never raises for the command's own failure: see ``rc``."""
        ...


class LocalRunner:
    """Runs commands on this machine."""

    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout_s: float = 60.0) -> CommandResult:
        args = tuple(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # a timeout ends what the command started, not only it
            )
        except FileNotFoundError:
            return CommandResult(args, NOT_FOUND, "", f"{args[0]}: not found")
        try:
            data = input.encode() if input is not None else None
            out, err = await asyncio.wait_for(proc.communicate(data), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return CommandResult(args, TIMED_OUT, "", f"timed out after {timeout_s:g} s")
        assert proc.returncode is not None
        return CommandResult(args, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
