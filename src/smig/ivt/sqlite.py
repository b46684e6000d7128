"""The IVT in one SQLite file: the default store of a region's RC-TCB.

Durability: WAL journal with ``synchronous=FULL``, so a committed trust decision survives a
power cut, not only a crash of the process. Readers in other processes (``smig ivt``) never
block the writer. ``busy_timeout`` makes a second writer wait rather than fail at once.

Threads: one connection per store, guarded by a re-entrant lock. A transaction holds the lock
from ``BEGIN IMMEDIATE`` to ``COMMIT``, so the asyncio thread and worker threads take turns and
each sees its own uncommitted writes. ``BEGIN IMMEDIATE`` takes SQLite's write lock at the start,
which avoids the deadlock of two readers both upgrading to writers.

Schema, version 3 (``PRAGMA user_version``; :data:`_MIGRATIONS` carries a file forward, a file
newer than this code is refused)::

    hosts(host PK, region, address, agent_key, manifest, state, state_since,
          capacity_vcpus, capacity_memory_mib, load_vcpus, load_memory_mib,
          verified_at, verified_monitor, verified_sequence, verified_root, verified_verdict,  -- all NULL or none
          suspected_by JSON list, strikes, enrolled_at)
    placements(vm PK, host -> hosts, vcpus, memory_mib, priority, anti_affinity, spec JSON)  -- spec: version 3
    sequences(monitor, subject, seq; PK (monitor, subject))
    audit(seq PK, at, kind, subject, body canonical JSON, prev, hash)
    meta(key PK, value)  -- 'audit_head': {"seq": N, "hash": "..."}
    orders(id PK, vm, state, active 0/1, body JSON)  -- migration orders; version 2

sqlite3 errors become StoreError here, and nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

from smig.errors import AuditChainBroken, HostExists, HostNotFound, IVTError, StoreError
from smig.ivt import audit
from smig.ivt.base import AuditEntry, StoredOrder
from smig.model import HostRecord, PlacedVM, Resources, TrustState, Verdict, VerifiedMeasurement

log = logging.getLogger(__name__)

_HEAD_KEY = "audit_head"
_PAGE = 500  # audit entries read per lock acquisition, so a long read never starves writers

# _MIGRATIONS[n] carries a file from schema n to n + 1; append, never edit a released step.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE hosts (
            host TEXT PRIMARY KEY, region TEXT NOT NULL, address TEXT NOT NULL, agent_key TEXT NOT NULL,
            manifest TEXT NOT NULL, state TEXT NOT NULL, state_since REAL NOT NULL,
            capacity_vcpus INTEGER NOT NULL, capacity_memory_mib INTEGER NOT NULL,
            load_vcpus INTEGER NOT NULL, load_memory_mib INTEGER NOT NULL,
            verified_at REAL, verified_monitor TEXT, verified_sequence INTEGER, verified_root TEXT,
            verified_verdict TEXT,
            suspected_by TEXT NOT NULL DEFAULT '[]', strikes INTEGER NOT NULL DEFAULT 0,
            enrolled_at REAL NOT NULL,
            CHECK ((verified_at IS NULL) = (verified_verdict IS NULL)))""",
        """CREATE TABLE placements (
            vm TEXT PRIMARY KEY, host TEXT NOT NULL REFERENCES hosts(host),
            vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL,
            priority INTEGER NOT NULL, anti_affinity TEXT NOT NULL)""",
        "CREATE INDEX placements_by_host ON placements(host)",
        """CREATE TABLE sequences (
            monitor TEXT NOT NULL, subject TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (monitor, subject))""",
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
            body TEXT NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL)""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f'INSERT INTO meta (key, value) VALUES (\'{_HEAD_KEY}\', \'{{"hash":"{audit.GENESIS}","seq":0}}\')',
    ),
    (
        # The orchestrator's orders, written ahead of every step so a restarted RC-TCB resumes them.
        """CREATE TABLE orders (
            id TEXT PRIMARY KEY, vm TEXT NOT NULL, state TEXT NOT NULL,
            active INTEGER NOT NULL CHECK (active IN (0, 1)), body TEXT NOT NULL)""",
        "CREATE INDEX orders_active ON orders(active, id)",
    ),
    (
        # What a target needs to prepare for a VM, as the agent reported it.
        "ALTER TABLE placements ADD COLUMN spec TEXT NOT NULL DEFAULT ''",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_HOST_COLUMNS = (
    "host, region, address, agent_key, manifest, state, state_since, capacity_vcpus, capacity_memory_mib, "
    "load_vcpus, load_memory_mib, verified_at, verified_monitor, verified_sequence, verified_root, "
    "verified_verdict, suspected_by, strikes, enrolled_at"
)
_PLACEMENT_COLUMNS = "vm, host, vcpus, memory_mib, priority, anti_affinity, spec"


def _host_row(r: HostRecord) -> tuple[Any, ...]:
    v = r.verified
    return (
        r.host, r.region, r.address, r.agent_key, r.manifest, r.state.value, r.state_since,
        r.capacity.vcpus, r.capacity.memory_mib, r.load.vcpus, r.load.memory_mib,
        v.at if v else None, v.monitor if v else None, v.sequence if v else None, v.root if v else None,
        v.verdict.value if v else None,
        json.dumps(list(r.suspected_by)), r.strikes, r.enrolled_at,
    )  # fmt: skip


def _host_record(row: sqlite3.Row) -> HostRecord:
    try:
        verified = None
        if row["verified_at"] is not None:
            verified = VerifiedMeasurement(
                row["verified_at"], row["verified_monitor"], row["verified_sequence"], row["verified_root"],
                Verdict(row["verified_verdict"]),
            )  # fmt: skip
        return HostRecord(
            host=row["host"], region=row["region"], address=row["address"], agent_key=row["agent_key"],
            manifest=row["manifest"], state=TrustState(row["state"]), state_since=row["state_since"],
            capacity=Resources(row["capacity_vcpus"], row["capacity_memory_mib"]),
            load=Resources(row["load_vcpus"], row["load_memory_mib"]),
            verified=verified, suspected_by=tuple(json.loads(row["suspected_by"])), strikes=row["strikes"],
            enrolled_at=row["enrolled_at"],
        )  # fmt: skip
    except (ValueError, TypeError) as e:  # an unknown enum value, a malformed JSON list
        raise StoreError(f"the IVT row of {row['host']!r} cannot be read: {e}", host=row["host"]) from e


def _placed_vm(row: sqlite3.Row) -> PlacedVM:
    return PlacedVM(
        row["vm"],
        row["host"],
        Resources(row["vcpus"], row["memory_mib"]),
        row["priority"],
        row["anti_affinity"],
        row["spec"],
    )


def _stored_order(row: sqlite3.Row) -> StoredOrder:
    try:
        body = json.loads(row["body"])
        if not isinstance(body, dict):
            raise TypeError("its body is not a JSON object")
    except (ValueError, TypeError) as e:
        raise StoreError(f"the order {row['id']!r} cannot be read: {e}") from e
    return StoredOrder(str(row["id"]), str(row["vm"]), str(row["state"]), bool(row["active"]), MappingProxyType(body))


def _audit_entry(row: sqlite3.Row) -> AuditEntry:
    try:
        body = json.loads(row["body"])
        if not isinstance(body, dict):
            raise TypeError("its body is not a JSON object")
        return AuditEntry(
            int(row["seq"]), float(row["at"]), str(row["kind"]), str(row["subject"]),
            MappingProxyType(body), str(row["prev"]), str(row["hash"]),
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        raise AuditChainBroken(row["seq"], f"audit entry {row['seq']} cannot be read (it was altered): {e}") from e


class SQLiteStore:
    """The IVT in the SQLite file at ``path`` (see the module docstring). Raises StoreError.

    With ``create=False`` a missing file is an error instead of a new empty store.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path).expanduser().absolute()
        self._lock = threading.RLock()
        self._tx: SQLiteTransaction | None = None
        self._closed = False
        if not create and not self.path.is_file():
            raise StoreError(f"no IVT database at {self.path}")
        with self._errors("open"):
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # mode=rw: never create a file when asked not to, even if it vanished since the check.
            uri = f"{self.path.as_uri()}?mode={'rwc' if create else 'rw'}"
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so sqlite3 never commits behind our back.
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            with self._errors("open"):
                self._conn.row_factory = sqlite3.Row
                self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{self.path}: SQLite refused WAL journaling (got {mode}); use a local filesystem")
                self._conn.execute("PRAGMA synchronous = FULL")
                self._conn.execute("PRAGMA foreign_keys = ON")
                self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        # The version is read again under the write lock: another process may have migrated meanwhile.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} holds IVT schema {version}, newer than this SMIG knows ({SCHEMA_VERSION}): "
                    "upgrade SMIG to use it, or point at another database"
                )
            for step in range(version, SCHEMA_VERSION):
                log.info("migrating %s from IVT schema %d to %d", self.path, step, step + 1)
                for statement in _MIGRATIONS[step]:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {step + 1}")
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate sqlite3's errors into StoreError, naming the file and the operation."""
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"IVT store {self.path}: {what} failed: {e}") from e

    @contextmanager
    def _reading(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors(what):
            if self._closed:
                raise StoreError(f"IVT store {self.path} is closed")
            yield self._conn

    # -- reads ---------------------------------------------------------------------------------

    def get(self, host: str) -> HostRecord:
        with self._reading("reading a host") as c:
            row = c.execute(f"SELECT {_HOST_COLUMNS} FROM hosts WHERE host = ?", (host,)).fetchone()
        if row is None:
            raise HostNotFound(f"no IVT row for host {host!r}", host=host)
        return _host_record(row)

    def hosts(self) -> list[HostRecord]:
        with self._reading("reading hosts") as c:
            rows = c.execute(f"SELECT {_HOST_COLUMNS} FROM hosts ORDER BY host").fetchall()
        return [_host_record(r) for r in rows]

    def placements(self, host: str | None = None) -> list[PlacedVM]:
        with self._reading("reading placements") as c:
            if host is None:
                rows = c.execute(f"SELECT {_PLACEMENT_COLUMNS} FROM placements ORDER BY host, vm").fetchall()
            else:
                sql = f"SELECT {_PLACEMENT_COLUMNS} FROM placements WHERE host = ? ORDER BY vm"
                rows = c.execute(sql, (host,)).fetchall()
        return [_placed_vm(r) for r in rows]

    def last_sequence(self, monitor: str, subject: str) -> int | None:
        with self._reading("reading a sequence") as c:
            sql = "SELECT seq FROM sequences WHERE monitor = ? AND subject = ?"
            row = c.execute(sql, (monitor, subject)).fetchone()
        return None if row is None else int(row["seq"])

    def orders(self, active_only: bool = True) -> list[StoredOrder]:
        where = "WHERE active = 1 " if active_only else ""
        with self._reading("reading orders") as c:
            rows = c.execute(f"SELECT id, vm, state, active, body FROM orders {where}ORDER BY id").fetchall()
        return [_stored_order(r) for r in rows]

    def audit_entries(self, since: int = 0) -> Iterator[AuditEntry]:
        while True:
            with self._reading("reading the audit log") as c:
                rows = c.execute(
                    "SELECT seq, at, kind, subject, body, prev, hash FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                    (since, _PAGE),
                ).fetchall()
            for row in rows:
                yield _audit_entry(row)
            if len(rows) < _PAGE:
                return
            since = int(rows[-1]["seq"])

    def _head(self) -> audit.AuditHead:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (_HEAD_KEY,)).fetchone()
        if row is None:
            raise AuditChainBroken(1, "the audit log's head record is missing from the store's meta table")
        try:
            head = json.loads(row["value"])
            return audit.AuditHead(int(head["seq"]), str(head["hash"]))
        except (ValueError, TypeError, KeyError) as e:
            raise AuditChainBroken(1, f"the audit log's head record cannot be read: {e}") from e

    def verify_audit(self) -> int:
        # One read transaction under the lock: the entries and the head come from the same snapshot,
        # so an append by another thread or process cannot pass for a head mismatch.
        with self._reading("verifying the audit log") as c:
            own = not c.in_transaction
            if own:
                c.execute("BEGIN")
            try:
                head = self._head()
                rows = c.execute("SELECT seq, at, kind, subject, body, prev, hash FROM audit ORDER BY seq")
                return audit.verify((_audit_entry(r) for r in rows), head)
            finally:
                if own:
                    c.execute("COMMIT")

    # -- writes --------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[SQLiteTransaction]:
        with self._lock:
            if self._tx is not None:
                raise StoreError("IVT transactions do not nest: finish the open one first")
            with self._reading("starting a transaction") as c:
                c.execute("BEGIN IMMEDIATE")
                try:
                    tx = SQLiteTransaction(self, self._head())
                except BaseException:  # an unreadable head must not leave the write lock taken
                    c.execute("ROLLBACK")
                    raise
            self._tx = tx
            try:
                yield tx
                tx._write_head()
                with self._errors("commit"):
                    c.execute("COMMIT")
            except BaseException:
                # Also on cancellation and Ctrl-C: a half-done step must not stay half-done.
                if c.in_transaction:
                    with self._errors("rollback"):
                        c.execute("ROLLBACK")
                raise
            finally:
                tx._open = False
                self._tx = None

    def enroll(self, record: HostRecord) -> None:
        with self.transaction() as tx:
            tx._insert(record)
            body = {
                "region": record.region,
                "address": record.address,
                "agent_key": record.agent_key,
                "manifest": record.manifest,
                "state": record.state.value,
                "capacity": {"vcpus": record.capacity.vcpus, "memory_mib": record.capacity.memory_mib},
            }
            tx.audit("host.enrolled", record.host, body, record.enrolled_at)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._errors("close"):
                self._conn.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"


class SQLiteTransaction:
    """The writes of one :meth:`SQLiteStore.transaction` block; usable only inside it, on its thread."""

    def __init__(self, store: SQLiteStore, head: audit.AuditHead) -> None:
        self._store = store
        self._head = head
        self._owner = threading.get_ident()
        self._open = True
        self._moved = False

    @contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        if not self._open:
            raise StoreError("this IVT transaction has ended; open a new one")
        if threading.get_ident() != self._owner:
            raise StoreError("an IVT transaction belongs to the thread that opened it")
        with self._store._errors(what):
            yield self._store._conn

    def _insert(self, record: HostRecord) -> None:
        with self._writing("enrolling a host") as c:
            if c.execute("SELECT 1 FROM hosts WHERE host = ?", (record.host,)).fetchone():
                raise HostExists(f"host {record.host!r} is already enrolled", host=record.host)
            row = _host_row(record)
            c.execute(f"INSERT INTO hosts ({_HOST_COLUMNS}) VALUES ({', '.join('?' * len(row))})", row)

    def put(self, record: HostRecord) -> None:
        self.put_all([record])

    def put_all(self, records: Sequence[HostRecord]) -> None:
        columns = _HOST_COLUMNS.split(", ")[1:]
        sql = f"UPDATE hosts SET {', '.join(f'{c} = ?' for c in columns)} WHERE host = ?"
        rows = [(*_host_row(r)[1:], r.host) for r in records]
        with self._writing("updating hosts") as c:
            before = c.total_changes
            c.executemany(sql, rows)
            if c.total_changes - before != len(rows):
                known = {h for (h,) in c.execute("SELECT host FROM hosts")}
                missing = next(r.host for r in records if r.host not in known)
                raise HostNotFound(f"no IVT row for host {missing!r}: enrol it first", host=missing)

    def set_placements(self, host: str, vms: Sequence[PlacedVM]) -> None:
        for vm in vms:
            if vm.host != host:
                raise IVTError(f"VM {vm.name!r} names host {vm.host!r}, not {host!r}", vm=vm.name, host=host)
        with self._writing("placing VMs") as c:
            if c.execute("SELECT 1 FROM hosts WHERE host = ?", (host,)).fetchone() is None:
                raise HostNotFound(f"no IVT row for host {host!r}: enrol it before placing VMs on it", host=host)
            c.execute("DELETE FROM placements WHERE host = ?", (host,))
            # A VM runs in one place only: placing it here moves its row from wherever it was.
            c.executemany(
                f"INSERT OR REPLACE INTO placements ({_PLACEMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(v.name, host, v.needs.vcpus, v.needs.memory_mib, v.priority, v.anti_affinity, v.spec) for v in vms],
            )

    def set_last_sequence(self, monitor: str, subject: str, seq: int) -> None:
        self.set_last_sequences([(monitor, subject, seq)])

    def set_last_sequences(self, items: Sequence[tuple[str, str, int]]) -> None:
        with self._writing("recording sequences") as c:
            c.executemany(
                "INSERT INTO sequences (monitor, subject, seq) VALUES (?, ?, ?) "
                "ON CONFLICT (monitor, subject) DO UPDATE SET seq = excluded.seq",
                items,
            )

    def audit(self, kind: str, subject: str, body: Mapping[str, object], at: float) -> AuditEntry:
        try:
            # The entry carries the body as it will read back (tuples become lists), and `at` as the
            # float the REAL column returns: otherwise 1000 would hash differently from 1000.0.
            text = audit.canonical_json(dict(body))
            entry = audit.next_entry(self._head, float(at), kind, subject, MappingProxyType(json.loads(text)))
        except (ValueError, TypeError) as e:
            raise StoreError(f"audit entry {kind!r} about {subject!r} has a body that is not JSON: {e}") from e
        with self._writing("appending to the audit log") as c:
            c.execute(
                "INSERT INTO audit (seq, at, kind, subject, body, prev, hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (entry.seq, entry.at, entry.kind, entry.subject, text, entry.prev, entry.hash),
            )
        self._head = audit.AuditHead(entry.seq, entry.hash)
        self._moved = True
        return entry

    def put_order(self, order: StoredOrder) -> None:
        try:
            body = audit.canonical_json(dict(order.body))
        except (ValueError, TypeError) as e:
            raise StoreError(f"order {order.id!r} has a body that is not JSON: {e}", vm=order.vm) from e
        with self._writing("recording an order") as c:
            c.execute(
                "INSERT INTO orders (id, vm, state, active, body) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET vm = excluded.vm, state = excluded.state, "
                "active = excluded.active, body = excluded.body",
                (order.id, order.vm, order.state, int(order.active), body),
            )

    def _write_head(self) -> None:
        """Record the chain's head once, as the transaction commits (it moves with every entry)."""
        if self._moved:
            head = audit.canonical_json({"seq": self._head.seq, "hash": self._head.hash})
            with self._writing("recording the audit head") as c:
                c.execute("UPDATE meta SET value = ? WHERE key = ?", (head, _HEAD_KEY))
