"""Short QMP sessions over a QEMU monitor socket, with qemu.qmp's errors translated once.

Each QEMU that SMIG starts has two monitors: ``qmp.sock`` for commands that change it and
``qmp-aux.sock`` for queries, because a QMP socket serves one client at a time and a status
query must not wait behind a migration being driven.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, Runstate
from qemu.qmp import QMPError as LibQMPError

from smig.errors import QMPError

log = logging.getLogger(__name__)
# qemu.qmp logs every disconnect of a QEMU that was told to quit as an error; it is expected.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QMPCommandError(QMPError):
    """QEMU refused a command; ``error_class`` and ``desc`` are QEMU's own words."""

    def __init__(self, command: str, error_class: str, desc: str, *, vm: str | None = None) -> None:
        super().__init__(f"QEMU refused {command}: {desc}", vm=vm)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class Session:
    """One connected QMP client."""

    def __init__(self, client: QMPClient, vm: str | None) -> None:
        self._client = client
        self._vm = vm

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command and return its reply.

        Raises:
            QMPCommandError: QEMU answered with an error.
            QMPError: the connection failed.
        """
        try:
            return await self._client.execute(command, arguments or None)
        except ExecuteError as e:
            raise QMPCommandError(command, e.error_class, str(e), vm=self._vm) from e
        except (LibQMPError, OSError, EOFError) as e:
            raise QMPError(f"QMP {command} failed: {e}", vm=self._vm) from e

    @property
    def connected(self) -> bool:
        return self._client.runstate is Runstate.RUNNING

    async def close(self) -> None:
        with suppress(LibQMPError, OSError, EOFError):
            await self._client.disconnect()

    async def quit(self) -> None:
        """Ask QEMU to exit; the connection closing under us is the expected answer."""
        with suppress(LibQMPError, OSError, EOFError):
            await self._client.execute("quit")


async def connect(socket: Path, *, vm: str | None = None, timeout_s: float = 10.0) -> Session:
    """A session with the monitor at ``socket``; the caller closes it.

    Raises:
        QMPError: cannot connect within ``timeout_s``.
    """
    client = QMPClient(vm or "smig")
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout_s)
    except (ConnectError, LibQMPError, OSError, TimeoutError, EOFError, AssertionError) as e:
        # qemu.qmp asserts on its own state when QEMU closes the socket just as the session
        # starts (a QEMU exiting after its migration, as an agent lists its VMs): seen in the
        # lab, where it escaped untranslated and took the agent down.
        with suppress(Exception):
            await client.disconnect()
        raise QMPError(f"cannot reach QEMU's monitor at {socket}: {e}", vm=vm) from e
    return Session(client, vm)


@asynccontextmanager
async def session(socket: Path, *, vm: str | None = None, timeout_s: float = 10.0) -> AsyncIterator[Session]:
    """Connect to the monitor at ``socket`` for the duration of the block.

    Raises:
        QMPError: cannot connect within ``timeout_s``.
    """
    s = await connect(socket, vm=vm, timeout_s=timeout_s)
    try:
        yield s
    finally:
        await s.close()
