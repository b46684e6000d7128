"""The executor's journal: every order this host was given, its side and its stage, on disk.

One JSON file (``orders.json`` in the agent's state directory), replaced atomically (temp file,
fsync, rename), so a restarted agent knows every order it had and how far each got; see
:mod:`smig.agent.executor` for the stages and what they mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from smig.errors import ConfigError, HypervisorError

__all__ = ["JOURNAL", "TRANSITIONS", "Journal", "JournalOrder", "Side", "Stage"]

JOURNAL = "orders.json"


class Side(StrEnum):
    """What this host is to an order."""

    SOURCE = "source"
    TARGET = "target"
    RESTART = "restart"


class Stage(StrEnum):
    """Where one order stands on this host (see the module docstring)."""

    PREPARED = "prepared"
    ARRIVED = "arrived"
    ABORTED = "aborted"
    MIGRATING = "migrating"
    COMPLETING = "completing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STARTING = "starting"
    STARTED = "started"

    @property
    def in_flight(self) -> bool:
        """Followed until it settles: QEMU may move it on while nobody asks."""
        return self in (Stage.PREPARED, Stage.MIGRATING, Stage.COMPLETING)


_S = Stage
TRANSITIONS: frozenset[tuple[Stage, Stage]] = frozenset(
    {
        (_S.PREPARED, _S.ARRIVED),
        (_S.PREPARED, _S.ABORTED),
        (_S.ABORTED, _S.PREPARED),
        (_S.MIGRATING, _S.COMPLETING),
        (_S.MIGRATING, _S.FAILED),
        (_S.MIGRATING, _S.CANCELLED),
        (_S.COMPLETING, _S.COMPLETED),
        (_S.STARTING, _S.STARTED),
        (_S.STARTED, _S.STARTING),
    }
)
"""Every stage change an order may make; an order's first stage is set by its side."""


@dataclass(frozen=True)
class JournalOrder:
    """One journal entry. ``incoming`` is the target's slot (an IncomingVM as JSON)."""

    id: str
    side: Side
    vm: str
    stage: Stage
    address: str = ""
    incoming: dict[str, Any] | None = None
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    error: str | None = None
    updated_at: float = 0.0

    def to(self, stage: Stage, **changes: Any) -> JournalOrder:
        assert stage is self.stage or (self.stage, stage) in TRANSITIONS, f"{self.stage} → {stage} is not allowed"
        return replace(self, stage=stage, **changes)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "side": self.side.value, "stage": self.stage.value}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> JournalOrder:
        return cls(**{**body, "side": Side(body["side"]), "stage": Stage(body["stage"])})


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


class Journal:
    """The orders this host took, in memory and in ``orders.json``; finished ones are kept for
    ``retention_s`` so that a late repeat of the RC-TCB still finds them."""

    def __init__(self, directory: Path, retention_s: float, clock: Callable[[], float]) -> None:
        self.path = directory / JOURNAL
        self._retention_s = retention_s
        self._clock = clock
        self._lock = asyncio.Lock()
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            body = json.loads(self.path.read_text()) if self.path.exists() else {"orders": {}}
            self.orders = {k: JournalOrder.from_json(v) for k, v in body["orders"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"cannot read the order journal {self.path}: {e}. Move it aside to start with an empty "
                "journal; orders in flight are then forgotten (the RC-TCB finds the VMs with `where`)"
            ) from e

    async def put(self, order: JournalOrder) -> JournalOrder:
        order = replace(order, updated_at=self._clock())
        self.orders[order.id] = order
        await self._save()
        return order

    def touch(self, order: JournalOrder) -> JournalOrder:
        """Keep a change in memory only (live byte counts); the next write takes it along."""
        self.orders[order.id] = order
        return order

    async def drop(self, order_id: str) -> None:
        self.orders.pop(order_id, None)
        await self._save()

    async def _save(self) -> None:
        async with self._lock:
            horizon = self._clock() - self._retention_s
            for key in [k for k, o in self.orders.items() if not o.stage.in_flight and o.updated_at < horizon]:
                del self.orders[key]
            text = json.dumps({"version": 1, "orders": {k: o.to_json() for k, o in self.orders.items()}}, indent=1)
            try:
                await asyncio.to_thread(_write_atomic, self.path, text)
            except OSError as e:
                raise HypervisorError(f"cannot write the order journal {self.path}: {e.strerror or e}") from e
