"""The IVT store on real SQLite files: what is written stays written, atomically, and tampering shows."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smig.errors import AuditChainBroken, HostExists, HostNotFound, IVTError, StoreError
from smig.ivt import IVTStore, audit, open_store
from smig.ivt.sqlite import SCHEMA_VERSION, SQLiteStore
from smig.model import HostRecord, PlacedVM, Resources, TrustState, Verdict, VerifiedMeasurement

SMIG = str(Path(sys.executable).parent / "smig")


def host(name: str, state: TrustState = TrustState.TRUSTED, verified_at: float | None = None) -> HostRecord:
    verified = VerifiedMeasurement(verified_at, "mon-a", 7, "ab" * 32, Verdict.MATCH) if verified_at else None
    return HostRecord(
        host=name,
        region="r1",
        address=f"10.0.0.{len(name)}",
        agent_key="-----BEGIN PUBLIC KEY-----\nMCow\n-----END PUBLIC KEY-----\n",
        manifest="cd" * 32,
        state=state,
        state_since=1000.0,
        capacity=Resources(8, 16384),
        load=Resources(2, 2048),
        verified=verified,
        suspected_by=("mon-b", "mon-c"),
        strikes=1,
        enrolled_at=900.5,
    )


def vm(name: str, on: str) -> PlacedVM:
    spec = f'{{"name": "{name}", "memory_mib": 512}}'
    return PlacedVM(name, on, Resources(1, 512), priority=3, anti_affinity="db", spec=spec)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ivt.sqlite"


@pytest.fixture
def store(db: Path) -> Iterator[IVTStore]:
    s = open_store(str(db))
    yield s
    s.close()


def everything(s: IVTStore) -> tuple[Any, ...]:
    """All a reader can observe, to compare before and after."""
    seqs = {(m, h): s.last_sequence(m, h) for m in ("mon-a", "mon-b") for h in ("h1", "h2")}
    return s.hosts(), s.placements(), seqs, list(s.audit_entries())


def region(s: IVTStore) -> None:
    """Two hosts, a VM on one, a sequence, and a trust change: five audit entries in all."""
    s.enroll(host("h1", verified_at=1500.25))
    s.enroll(host("h2", TrustState.SUSPECT))
    with s.transaction() as tx:
        tx.set_placements("h1", [vm("web", "h1"), vm("db", "h1")])
        tx.set_last_sequence("mon-a", "h1", 7)
        tx.audit("report.accepted", "h1", {"monitor": "mon-a", "sequence": 7}, 1500.25)
    with s.transaction() as tx:
        tx.put(dataclasses.replace(s.get("h2"), state=TrustState.UNTRUSTED, state_since=1600.0))
        tx.audit("trust.changed", "h2", {"from": "suspect", "to": "untrusted", "by": ["mon-a", "mon-b"]}, 1600)
    with s.transaction() as tx:
        tx.audit("evacuation.planned", "h2", {"vms": [], "score": 0.1}, 1600.5)


def raw(db: Path, *statements: str) -> None:
    """Change the file behind the store's back, as someone with write access to it could."""
    with sqlite3.connect(db) as c:
        for statement in statements:
            c.execute(statement)
    c.close()


# -- rows -----------------------------------------------------------------------------------------


def test_an_enrolled_host_reads_back_exactly(store: IVTStore) -> None:
    record = host("h1", verified_at=1500.25)
    store.enroll(record)
    store.enroll(host("a0", TrustState.ENROLLING))
    assert store.get("h1") == record
    assert [h.host for h in store.hosts()] == ["a0", "h1"]
    assert store.get("h1").verified_at == 1500.25 and store.get("a0").verified_at is None
    assert [e.kind for e in store.audit_entries()] == ["host.enrolled", "host.enrolled"]


def test_enrolling_twice_is_refused_and_an_unknown_host_is_not_found(store: IVTStore) -> None:
    store.enroll(host("h1"))
    with pytest.raises(HostExists, match="h1"):
        store.enroll(host("h1", TrustState.SUSPECT))
    assert store.get("h1").state is TrustState.TRUSTED
    with pytest.raises(HostNotFound, match="nope"):
        store.get("nope")
    with pytest.raises(HostNotFound), store.transaction() as tx:
        tx.put(host("nope"))
    with pytest.raises(HostNotFound), store.transaction() as tx:
        tx.set_placements("nope", [vm("web", "nope")])
    assert [h.host for h in store.hosts()] == ["h1"] and store.placements() == []
    assert store.verify_audit() == 1


def test_placing_a_vm_on_another_host_moves_it(store: IVTStore) -> None:
    region(store)
    with store.transaction() as tx:
        tx.set_placements("h2", [vm("web", "h2")])
    assert store.placements("h1") == [vm("db", "h1")]
    assert store.placements() == [vm("db", "h1"), vm("web", "h2")]
    with pytest.raises(IVTError, match="names host 'h1'"), store.transaction() as tx:
        tx.set_placements("h2", [vm("db", "h1")])


def test_a_transaction_that_raises_changes_nothing(store: IVTStore) -> None:
    region(store)
    before = everything(store)
    with pytest.raises(RuntimeError, match="crash"), store.transaction() as tx:
        tx.put(dataclasses.replace(store.get("h1"), state=TrustState.UNTRUSTED))
        tx.set_placements("h1", [])
        tx.set_placements("h2", [vm("web", "h2")])
        tx.set_last_sequence("mon-a", "h1", 8)
        tx.set_last_sequence("mon-b", "h2", 1)
        tx.audit("trust.changed", "h1", {"to": "untrusted"}, 1700.0)
        assert store.get("h1").state is TrustState.UNTRUSTED  # the block sees its own writes
        raise RuntimeError("crash mid-decision")
    assert everything(store) == before
    assert store.verify_audit() == 5
    with store.transaction() as tx:  # and the chain goes on from the old head
        tx.audit("trust.changed", "h1", {"to": "untrusted"}, 1700.0)
    assert store.verify_audit() == 6


def test_transactions_do_not_nest_and_end_with_their_block(store: IVTStore) -> None:
    store.enroll(host("h1"))
    with store.transaction() as tx:
        with pytest.raises(StoreError, match="do not nest"), store.transaction():
            pass
        tx.set_last_sequence("mon-a", "h1", 1)
    with pytest.raises(StoreError, match="ended"):
        tx.set_last_sequence("mon-a", "h1", 2)
    assert store.last_sequence("mon-a", "h1") == 1


def test_an_audit_entry_reads_back_as_it_was_returned(store: IVTStore) -> None:
    with store.transaction() as tx:
        written = tx.audit("k", "h1", {"ids": (1, 2), "ratio": 0.1, "nested": {"b": 1, "a": None}}, 1000)
    assert list(store.audit_entries()) == [written]
    assert written.at == 1000.0 and written.prev == audit.GENESIS and written.body["ids"] == [1, 2]
    with pytest.raises(StoreError, match="not JSON"), store.transaction() as tx:
        tx.audit("k", "h1", {"bad": float("nan")}, 1001)
    assert store.verify_audit() == 1


# -- durability and schema ------------------------------------------------------------------------


def test_everything_survives_close_and_reopen(db: Path) -> None:
    first = open_store(str(db))
    region(first)
    before = everything(first)
    first.close()
    first.close()  # harmless
    with pytest.raises(StoreError, match="closed"):
        first.hosts()
    again = open_store(f"sqlite://{db}", create=False)
    try:
        assert everything(again) == before
        assert again.last_sequence("mon-a", "h1") == 7
        assert again.verify_audit() == 5
    finally:
        again.close()


def test_the_file_is_in_wal_mode_with_the_current_schema(store: IVTStore, db: Path) -> None:
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    c.close()


def test_a_database_from_a_newer_schema_is_refused(db: Path) -> None:
    open_store(str(db)).close()
    raw(db, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=r"newer than this SMIG knows.*upgrade SMIG"):
        open_store(str(db))
    with sqlite3.connect(db) as c:  # refused, and left alone
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    c.close()


def test_a_missing_or_foreign_file_is_a_store_error(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sqlite"
    with pytest.raises(StoreError, match="no IVT database"):
        open_store(str(missing), create=False)
    assert not missing.exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a database") as caught:
        SQLiteStore(junk)
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


def test_the_backend_is_chosen_by_url(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"unknown IVT store scheme 'etcd'.*supported: sqlite"):
        open_store("etcd://10.0.0.1:2379")
    with pytest.raises(StoreError, match="absolute path"):
        open_store("sqlite://relative.sqlite")
    open_store(f"sqlite://{tmp_path}/by-url.sqlite").close()
    assert (tmp_path / "by-url.sqlite").is_file()


# -- the audit chain ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper, seq, says",
    [
        ("""UPDATE audit SET body = '{"monitor":"mon-z","sequence":7}' WHERE seq = 3""", 3, "hash mismatch"),
        ("UPDATE audit SET at = 1.0 WHERE seq = 2", 2, "hash mismatch"),
        ("DELETE FROM audit WHERE seq = 3", 3, "gap in seq"),
        ("DELETE FROM audit WHERE seq = 5", 5, "head mismatch"),
        ("UPDATE audit SET seq = CASE seq WHEN 2 THEN -3 ELSE -2 END WHERE seq IN (2, 3)", 2, "does not link"),
        ("UPDATE audit SET body = 'not json' WHERE seq = 4", 4, "cannot be read"),
    ],
    ids=["edit-body", "edit-time", "delete-middle", "delete-last", "swap", "garble"],
)
def test_tampering_names_the_first_bad_entry(db: Path, tamper: str, seq: int, says: str) -> None:
    s = open_store(str(db))
    region(s)
    assert s.verify_audit() == 5
    s.close()
    raw(db, tamper, "UPDATE audit SET seq = -seq WHERE seq < 0")  # the second step finishes a swap
    s = open_store(str(db))
    try:
        with pytest.raises(AuditChainBroken, match=says) as caught:
            s.verify_audit()
        assert caught.value.seq == seq and f"audit entry {seq}" in str(caught.value)
    finally:
        s.close()


def test_the_pure_chain_check() -> None:
    assert audit.verify([], audit.EMPTY_HEAD) == 0
    first = audit.next_entry(audit.EMPTY_HEAD, 1.5, "k", "h1", {"x": 1})
    second = audit.next_entry(audit.AuditHead(1, first.hash), 2.0, "k", "h1", {})
    assert audit.verify([first, second], audit.AuditHead(2, second.hash)) == 2
    with pytest.raises(AuditChainBroken, match="beyond the recorded head") as caught:
        audit.verify([first, second], audit.AuditHead(1, first.hash))
    assert caught.value.seq == 2
    assert audit.canonical_json({"b": 0.1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":0.1}'


# -- threads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "two-stores"])
def test_two_threads_writing_at_once_both_land(db: Path, shared: bool) -> None:
    setup = open_store(str(db))
    setup.enroll(host("h1"))
    setup.enroll(host("h2"))
    rounds, errors = 40, []
    start = threading.Barrier(2)

    def writer(name: str) -> None:
        s = setup if shared else open_store(str(db))
        try:
            start.wait()
            for i in range(rounds):
                with s.transaction() as tx:
                    tx.put(dataclasses.replace(s.get(name), strikes=i + 1))
                    tx.set_last_sequence("mon-a", name, i)
                    tx.audit("strike", name, {"n": i}, 2000.0 + i)
        except BaseException as e:
            errors.append(e)
        finally:
            if not shared:
                s.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("h1", "h2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert [(h.host, h.strikes) for h in setup.hosts()] == [("h1", rounds), ("h2", rounds)]
        assert setup.last_sequence("mon-a", "h1") == setup.last_sequence("mon-a", "h2") == rounds - 1
        assert setup.verify_audit() == 2 + 2 * rounds
    finally:
        setup.close()


# -- the command line -----------------------------------------------------------------------------


def smig(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SMIG_HOME=str(home))
    return subprocess.run([SMIG, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smig: error:"), done.stderr
    return lines[0]


def test_cli_shows_the_table_and_verifies_the_chain(tmp_path: Path) -> None:
    db = tmp_path / "rctcb" / "ivt.sqlite"
    s = open_store(str(db))
    region(s)
    s.close()

    rows = json.loads(smig(tmp_path, "ivt", "--json").stdout)
    assert [(r["host"], r["state"], r["verified_at"]) for r in rows] == [
        ("h1", "trusted", 1500.25),
        ("h2", "untrusted", None),
    ]
    assert rows[0]["vms"] == ["db", "web"]
    table = smig(tmp_path, "ivt")
    assert table.returncode == 0 and "h1" in table.stdout and "UNTRUSTED" in table.stdout

    intact = smig(tmp_path, "audit", "verify")
    assert intact.returncode == 0 and "5 entries" in intact.stdout
    listed = json.loads(smig(tmp_path, "audit", "list", "--since", "3", "--json").stdout)
    assert [e["seq"] for e in listed] == [4, 5]

    raw(db, "DELETE FROM audit WHERE seq = 4")
    broken = smig(tmp_path, "audit", "verify")
    assert broken.returncode == 3 and broken.stdout == ""
    assert "audit entry 4" in one_line_error(broken)
    as_json = smig(tmp_path, "audit", "verify", "--json")
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["seq"] == 4


@pytest.mark.parametrize("command", [("ivt",), ("ivt", "--json"), ("audit", "verify"), ("audit", "list")])
def test_cli_refuses_a_missing_database_without_creating_one(tmp_path: Path, command: tuple[str, ...]) -> None:
    done = smig(tmp_path, *command)
    assert done.returncode == 1 and done.stdout == ""
    assert "no IVT database" in one_line_error(done)
    assert not (tmp_path / "rctcb").exists()


def test_cli_help_teaches(tmp_path: Path) -> None:
    text = smig(tmp_path, "ivt", "--help").stdout
    for word in ("--db", "--json", "--watch", "verified_at", "TRUSTED"):
        assert word in text
    assert "head mismatch" in smig(tmp_path, "audit", "verify", "--help").stdout
