"""The audit log's hash chain: how an entry is hashed, and how a whole log is checked.

Each entry commits to the one before it::

    hash = sha256(prev_hex + canonical_json([seq, at, kind, subject, body])).hexdigest()

with ``prev`` of the first entry being 64 zeros. A store also keeps the chain's *head* (last seq
and hash) next to the entries and moves it in the same transaction as each append, so that
cutting entries off the end is caught too, not only edits, deletions and reorderings inside.

What this does not do: someone who can rewrite the database can recompute every hash and the
head. Catching that needs the head anchored outside the store (signed, or copied elsewhere).

Everything here is pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from smig.errors import AuditChainBroken
from smig.ivt.base import AuditEntry

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditHead:
    """Where the chain ends: the last entry's seq and hash (``0`` and :data:`GENESIS` when empty)."""

    seq: int
    hash: str


EMPTY_HEAD = AuditHead(0, GENESIS)


def canonical_json(value: object) -> str:
    """One spelling per value: sorted keys, no spaces, UTF-8 as is.

    Floats are written as ``repr`` (which ``json`` does already), the shortest text that reads
    back to the same double, so a value survives a round trip through the store unchanged.
    NaN and infinities are refused: they are not JSON. Raises ValueError or TypeError.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(prev: str, seq: int, at: float, kind: str, subject: str, body: Mapping[str, object]) -> str:
    """The hash an entry with these fields must carry."""
    payload = prev + canonical_json([seq, at, kind, subject, dict(body)])
    return hashlib.sha256(payload.encode()).hexdigest()


def next_entry(head: AuditHead, at: float, kind: str, subject: str, body: Mapping[str, object]) -> AuditEntry:
    """The entry that follows ``head``. Raises ValueError or TypeError when ``body`` is not JSON."""
    seq = head.seq + 1
    return AuditEntry(seq, at, kind, subject, body, head.hash, entry_hash(head.hash, seq, at, kind, subject, body))


def verify(entries: Iterable[AuditEntry], head: AuditHead) -> int:
    """Check ``entries`` (in the order stored) against each other and against ``head``.

    Returns the number of entries. Raises AuditChainBroken with the first bad seq: a missing
    entry (gap), an entry out of order, a broken link (``prev`` is not the previous ``hash``),
    an entry whose contents no longer match its hash, or a log that ends elsewhere than its head.
    """
    last = EMPTY_HEAD
    count = 0
    for e in entries:
        expected = last.seq + 1
        if e.seq < expected:
            raise AuditChainBroken(e.seq, f"audit entry {e.seq} is out of order: it comes after entry {last.seq}")
        if e.seq > expected:
            raise AuditChainBroken(
                expected, f"audit entry {expected} is missing: gap in seq, entry {last.seq} is followed by {e.seq}"
            )
        if e.prev != last.hash:
            raise AuditChainBroken(
                e.seq,
                f"audit entry {e.seq} does not link to entry {last.seq}: its prev is not that entry's hash "
                "(entries were removed, reordered or rewritten)",
            )
        if entry_hash(e.prev, e.seq, e.at, e.kind, e.subject, e.body) != e.hash:
            raise AuditChainBroken(
                e.seq, f"audit entry {e.seq} hash mismatch: its contents were changed after it was written"
            )
        last = AuditHead(e.seq, e.hash)
        count += 1
    if last.seq < head.seq:
        raise AuditChainBroken(
            last.seq + 1,
            f"audit entry {last.seq + 1} is missing: head mismatch, the log ends at {last.seq} "
            f"but its head says {head.seq} (the tail was cut off)",
        )
    if last.seq > head.seq:
        raise AuditChainBroken(
            head.seq + 1,
            f"audit entry {head.seq + 1} lies beyond the recorded head ({head.seq}): head mismatch, "
            "entries were added outside the store",
        )
    if last.hash != head.hash:
        raise AuditChainBroken(
            last.seq, f"audit entry {last.seq} head mismatch: its hash is not the one the head recorded"
        )
    return count
