"""The IVT store interface: what every backend (SQLite now, etcd later) promises the RC-TCB.

The interface is deliberately narrow. Reads are plain methods; every write goes through
:meth:`IVTStore.transaction`, whose block commits *with its audit entries* or not at all, so the
table and its audit log can never disagree. The one exception is :meth:`IVTStore.enroll`, which
runs its own transaction (and writes its own ``host.enrolled`` audit entry).

Every method may raise :class:`~smig.errors.StoreError` when the backend itself fails. Calls
block; the asyncio service calls them through ``asyncio.to_thread``. A store object may be
shared between threads, a transaction belongs to the thread that opened it.

Backends are chosen by URL, as tooz does it: :func:`open_store`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from smig.errors import StoreError
from smig.model import HostRecord, PlacedVM

SUPPORTED_SCHEMES = ("sqlite",)


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the hash-chained audit log.

    ``seq`` counts from 1 without gaps; ``at`` is Unix seconds, passed in by the caller (the
    store has no clock); ``kind`` names what happened (``"host.enrolled"``, ``"trust.changed"``);
    ``subject`` is usually a host id. ``prev`` is the previous entry's ``hash`` (64 zeros for the
    first entry) and ``hash`` is :func:`smig.ivt.audit.entry_hash` over all the other fields.
    """

    seq: int
    at: float
    kind: str
    subject: str
    body: Mapping[str, object]
    prev: str
    hash: str


@dataclass(frozen=True)
class StoredOrder:
    """A migration order as the store keeps it: opaque to the store but for its key fields.

    ``body`` is the whole order as a JSON object (:mod:`smig.rctcb.orders` writes and reads it);
    ``active`` says whether the orchestrator still has to drive it, so a restarted RC-TCB reads
    back only the orders it must resume.
    """

    id: str
    vm: str
    state: str
    active: bool
    body: Mapping[str, object]


class Transaction(Protocol):
    """The writes of one atomic step. Any exception that leaves the ``with`` block undoes all of them."""

    def put(self, record: HostRecord) -> None:
        """Replace the row of an enrolled host. Raises HostNotFound if it is not enrolled."""
        ...

    def put_all(self, records: Sequence[HostRecord]) -> None:
        """Replace the rows of several enrolled hosts at once. Raises HostNotFound."""
        ...

    def set_placements(self, host: str, vms: Sequence[PlacedVM]) -> None:
        """Make ``vms`` the exact set of VMs on ``host``; a VM listed here leaves any other host.

        Raises HostNotFound for a host not enrolled, IVTError for a VM whose ``host`` differs.
        """
        ...

    def set_last_sequence(self, monitor: str, subject: str, seq: int) -> None:
        """Record the last accepted report sequence of ``monitor`` about ``subject``."""
        ...

    def set_last_sequences(self, items: Sequence[tuple[str, str, int]]) -> None:
        """:meth:`set_last_sequence` for many ``(monitor, subject, seq)`` at once."""
        ...

    def audit(self, kind: str, subject: str, body: Mapping[str, object], at: float) -> AuditEntry:
        """Append an entry to the audit log; ``body`` must be JSON (StoreError otherwise)."""
        ...

    def put_order(self, order: StoredOrder) -> None:
        """Insert or replace the order of that ``id``; ``body`` must be JSON (StoreError otherwise)."""
        ...


class IVTStore(Protocol):
    """The Integrity Validation Table: hosts, VM placements, report sequences and the audit log."""

    def enroll(self, record: HostRecord) -> None:
        """Add a host's row (and a ``host.enrolled`` audit entry). Raises HostExists if it has one."""
        ...

    def get(self, host: str) -> HostRecord:
        """The row of ``host``. Raises HostNotFound."""
        ...

    def hosts(self) -> list[HostRecord]:
        """Every row, sorted by host id."""
        ...

    def placements(self, host: str | None = None) -> list[PlacedVM]:
        """The VMs on ``host`` (every host's with None), sorted by host, then name."""
        ...

    def last_sequence(self, monitor: str, subject: str) -> int | None:
        """The last accepted sequence of ``monitor``'s reports about ``subject``, None if none yet."""
        ...

    def orders(self, active_only: bool = True) -> list[StoredOrder]:
        """Migration orders (only those still active by default), sorted by id."""
        ...

    def transaction(self) -> AbstractContextManager[Transaction]:
        """An atomic write: commits when the block ends, rolls back if it raises. Does not nest."""
        ...

    def audit_entries(self, since: int = 0) -> Iterator[AuditEntry]:
        """Audit entries with ``seq > since``, in order. Raises AuditChainBroken on an unreadable entry."""
        ...

    def verify_audit(self) -> int:
        """Check the whole chain against its recorded head; the number of entries.

        Raises AuditChainBroken naming the first bad entry.
        """
        ...

    def close(self) -> None:
        """Release the backend; later calls raise StoreError. Closing twice is harmless."""
        ...


def open_store(url: str, *, create: bool = True) -> IVTStore:
    """The store at ``url``: ``sqlite:///abs/path`` or a plain path (both SQLite).

    With ``create=False`` a store that does not exist yet is an error rather than a new empty one
    (what a reader such as ``smig ivt`` wants). Raises StoreError for an unknown scheme, listing
    the supported ones, and for a store that cannot be opened.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "sqlite", url
    elif scheme == "sqlite" and not rest.startswith("/"):
        # tooz's form: sqlite:/// followed by an absolute path, so `rest` keeps its leading slash.
        raise StoreError(f"bad store URL {url!r}: SQLite URLs take an absolute path, as in sqlite:///var/ivt.sqlite")
    if scheme == "sqlite":
        if not rest:
            raise StoreError("empty IVT store path")
        # Imported here: the backend module depends on this one (AuditEntry).
        from smig.ivt.sqlite import SQLiteStore

        return SQLiteStore(rest, create=create)
    raise StoreError(f"unknown IVT store scheme {scheme!r} in {url!r}; supported: {', '.join(SUPPORTED_SCHEMES)}")
