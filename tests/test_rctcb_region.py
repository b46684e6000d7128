"""The RC-TCB core over a real SQLite IVT: signed reports in, trust states out, and a report that
must not count changes nothing but the audit log."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smig.aim.keys import generate_key, public_key_pem
from smig.aim.report import SignedReport, sign_report
from smig.errors import ConfigError, HostExists, ReportRejected
from smig.ivt.base import IVTStore, open_store
from smig.model import Report, Resources, TrustState, Verdict
from smig.rctcb.policy import Evacuate, PolicyConfig, PolicyKind, Remeasure, StateChanged
from smig.rctcb.region import Region, RegionConfig, ReportResult
from tests.helpers import region_report

T0 = 1_800_000_000.0
HOSTS = ("h1", "h2", "h3", "h4")


@dataclasses.dataclass
class Lab:
    path: Path
    store: IVTStore
    region: Region
    keys: dict[str, Ed25519PrivateKey]
    sequence: int = 0

    def report(self, monitor: str, subject: str, verdict: Verdict = Verdict.MATCH, **changes: Any) -> Report:
        self.sequence += 1
        return region_report(monitor, subject, self.sequence, T0 - 0.4, verdict, **changes)

    def send(self, report: Report, *, now: float = T0, key: Ed25519PrivateKey | None = None) -> Any:
        return self.region.ingest(sign_report(report, key or self.keys[report.monitor]), now)

    def monitor_of(self, subject: str, other_than: str = "") -> str:
        return next(m for m in self.region.assignment()[subject] if m != other_than)

    def not_monitor_of(self, subject: str) -> str:
        assigned = self.region.assignment()[subject]
        return next(h for h in HOSTS if h != subject and h not in assigned)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    path = tmp_path / "ivt.sqlite"
    store = open_store(str(path))
    region = Region(store, RegionConfig(max_age_s=30, max_skew_s=5))
    keys = {h: generate_key() for h in HOSTS}
    for h in HOSTS:
        region.enroll(
            h,
            agent_key=public_key_pem(keys[h]).decode(),
            manifest="m" * 64,
            capacity=Resources(8, 16384),
            now=T0 - 60,
            vouched=True,
        )
    yield Lab(path, store, region, keys)
    store.close()


def _state(lab: Lab) -> tuple[object, ...]:
    """Everything a report could change: the rows and every last sequence."""
    rows = tuple(lab.store.hosts())
    sequences = tuple(lab.store.last_sequence(m, s) for m in HOSTS for s in HOSTS)
    return rows, sequences


def test_an_assigned_monitors_match_is_recorded_with_its_sequence(lab: Lab) -> None:
    monitor = lab.monitor_of("h2")
    report, _ = lab.send(lab.report(monitor, "h2"))
    row = lab.store.get("h2")
    assert row.state is TrustState.TRUSTED and row.verified is not None
    assert (row.verified.monitor, row.verified.sequence, row.verified.at) == (monitor, report.sequence, T0 - 0.4)
    assert lab.store.last_sequence(monitor, "h2") == report.sequence
    kinds = [e.kind for e in lab.store.audit_entries()]
    assert kinds.count("host.enrolled") == 4 and kinds[-1] == "report.accepted"
    assert lab.store.verify_audit() == len(kinds)


def _bad_reports(lab: Lab) -> list[tuple[str, SignedReport, float]]:
    """(expected reason, signed report, now) for every way a report must be refused."""
    good = lab.report(lab.monitor_of("h1"), "h1")
    lab.send(good)  # accepted: the replays below refer to it
    m = good.monitor
    stranger = lab.not_monitor_of("h1")
    return [
        ("forged", sign_report(lab.report(m, "h1"), generate_key()), T0),
        ("not-assigned", sign_report(lab.report(stranger, "h1"), lab.keys[stranger]), T0),
        ("not-assigned", sign_report(lab.report("h1", "h1"), lab.keys["h1"]), T0),
        ("unknown-monitor", sign_report(lab.report("h9", "h1"), generate_key()), T0),
        ("replayed", sign_report(good, lab.keys[m]), T0),
        ("out-of-order", sign_report(dataclasses.replace(good, sequence=good.sequence - 1), lab.keys[m]), T0),
        ("stale", sign_report(lab.report(m, "h1"), lab.keys[m]), T0 + 31),
        ("from-the-future", sign_report(lab.report(m, "h1", ended_at=T0 + 60), lab.keys[m]), T0),
        ("malformed", SignedReport(b'{"subject": "h1"}', lab.keys[m].sign(b'{"subject": "h1"}'), m), T0),
    ]


def test_a_report_that_must_not_count_changes_nothing_but_the_audit_log(lab: Lab) -> None:
    cases = _bad_reports(lab)
    for reason, signed, now in cases:
        before = _state(lab)
        entries = lab.store.verify_audit()
        with pytest.raises(ReportRejected) as caught:
            lab.region.ingest(signed, now)
        assert caught.value.reason == reason, caught.value.message
        assert _state(lab) == before, f"a {reason} report changed the IVT"
        last = list(lab.store.audit_entries(since=entries))
        assert [(e.kind, e.body["reason"]) for e in last] == [("report.rejected", reason)]
    assert lab.store.verify_audit() > 0


def test_two_independent_mismatches_distrust_a_host_for_good_and_survive_a_restart(lab: Lab) -> None:
    first = lab.monitor_of("h3")
    _, decision = lab.send(lab.report(first, "h3", Verdict.MISMATCH))
    assert lab.store.get("h3").state is TrustState.SUSPECT
    assert Remeasure("h3", (first,), next(e.reason for e in decision.effects if isinstance(e, Remeasure))) in (
        decision.effects
    )
    second = lab.monitor_of("h3", other_than=first)
    _, decision = lab.send(lab.report(second, "h3", Verdict.MISMATCH))
    assert lab.store.get("h3").state is TrustState.UNTRUSTED
    assert any(isinstance(e, Evacuate) and e.host == "h3" for e in decision.effects)
    # h3 no longer monitors anyone, and its word no longer counts.
    assert all("h3" not in monitors for monitors in lab.region.assignment().values())
    with pytest.raises(ReportRejected) as caught:
        lab.send(lab.report("h3", "h4"))
    assert caught.value.reason == "not-assigned"
    # A good report cannot bring it back; only an operator's re-enrolment can.
    lab.send(lab.report(lab.monitor_of("h3"), "h3"))
    assert lab.store.get("h3").state is TrustState.UNTRUSTED
    lab.region.reenroll("h3", T0 + 1)
    assert lab.store.get("h3").state is TrustState.ENROLLING
    lab.store.close()
    reopened = Region(open_store(str(lab.path)))
    assert reopened.rows()["h3"].state is TrustState.ENROLLING
    assert [e.body["new"] for e in reopened.store.audit_entries() if e.kind == "trust.changed"] == [
        "suspect",
        "untrusted",
        "enrolling",
    ]
    kinds = [e.kind for e in reopened.store.audit_entries()]
    assert kinds.count("trust.changed") == 3 and "effect.evacuate" in kinds
    assert reopened.store.verify_audit() == len(kinds)
    reopened.store.close()


def test_immediate_policy_distrusts_on_the_first_mismatch_and_time_makes_the_silent_unknown(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "ivt.sqlite"))
    region = Region(store, RegionConfig(policy=PolicyConfig(kind=PolicyKind.IMMEDIATE, freshness_s=10)))
    keys = {h: generate_key() for h in HOSTS}
    for h in HOSTS:
        region.enroll(
            h,
            agent_key=public_key_pem(keys[h]).decode(),
            manifest="m",
            capacity=Resources(4, 4096),
            now=T0 - 5,
            vouched=True,
        )
    lab = Lab(tmp_path, store, region, keys)
    lab.send(lab.report(lab.monitor_of("h1"), "h1", Verdict.MISMATCH))
    assert store.get("h1").state is TrustState.UNTRUSTED
    decision = region.tick(T0 + 20, T0)
    changed = {e.host: e.new for e in decision.effects if isinstance(e, StateChanged)}
    assert changed == {"h2": TrustState.UNKNOWN, "h3": TrustState.UNKNOWN, "h4": TrustState.UNKNOWN}
    store.close()


def test_enrolment_refuses_a_second_row_and_a_key_that_is_not_one(lab: Lab) -> None:
    with pytest.raises(HostExists):
        lab.region.enroll(
            "h1", agent_key=public_key_pem(generate_key()).decode(), manifest="m", capacity=Resources(1, 1), now=T0
        )
    with pytest.raises(ConfigError, match="cannot enrol 'h5'"):
        lab.region.enroll("h5", agent_key="not a key", manifest="m", capacity=Resources(1, 1), now=T0)
    assert [r.host for r in lab.store.hosts()] == list(HOSTS)


def test_a_batch_is_judged_in_order_and_lands_in_one_transaction(lab: Lab) -> None:
    first = lab.monitor_of("h2")
    second = lab.monitor_of("h2", other_than=first)
    good = lab.report(first, "h2", Verdict.MISMATCH)
    batch = [
        sign_report(good, lab.keys[first]),
        sign_report(good, lab.keys[first]),  # the same report again, inside the batch: a replay
        sign_report(lab.report(second, "h2", Verdict.MISMATCH), lab.keys[second]),
        sign_report(lab.report(second, "h1"), lab.keys[second]),
    ]
    entries = lab.store.verify_audit()
    results = lab.region.ingest_batch(batch, T0, agent=first)
    # Over `first`'s connection only `first`'s reports count.
    assert [r.reason for r in results] == ["", "replayed", "wrong-agent", "wrong-agent"]
    assert lab.store.get("h2").state is TrustState.SUSPECT
    assert lab.store.last_sequence(first, "h2") == good.sequence
    results = lab.region.ingest_batch(batch[2:], T0)  # no agent named: the RC-TCB's own path
    assert [r.reason for r in results] == ["", ""]
    assert lab.store.get("h2").state is TrustState.UNTRUSTED
    kinds = [e.kind for e in lab.store.audit_entries(since=entries)]
    assert kinds.count("report.accepted") == 3 and kinds.count("report.rejected") == 3
    assert lab.store.verify_audit() == entries + len(kinds)


def test_a_signed_batch_counts_report_by_report_under_one_signature(lab: Lab) -> None:
    from smig.aim.report_batch import sign_batch

    monitor = lab.monitor_of("h1")
    subjects = [s for s, monitors in lab.region.assignment().items() if monitor in monitors]
    fresh = [lab.report(monitor, s) for s in subjects]
    stale = lab.report(monitor, subjects[0], started_at=T0 - 100, ended_at=T0 - 99)
    entries = lab.store.verify_audit()
    results = lab.region.ingest_batch([sign_batch([*fresh, stale], lab.keys[monitor])], T0, agent=monitor)
    assert [r.reason for r in results] == [""] * len(fresh) + ["stale"], "one stale report sinks only itself"
    # Reports and results on this path are built without their __init__: whole, equal to the originals.
    assert [r.report for r in results[: len(fresh)]] == fresh
    assert results[0] == ReportResult(fresh[0], monitor, rows=results[0].rows, effects=results[0].effects)
    assert all(lab.store.last_sequence(monitor, r.subject) == r.sequence for r in fresh)
    kinds = [e.kind for e in lab.store.audit_entries(since=entries)]
    assert kinds == ["report.rejected", "report.batch.accepted"]
    forged = sign_batch([lab.report(monitor, subjects[0])], generate_key())
    before = _state(lab)
    results = lab.region.ingest_batch([forged], T0, agent=monitor)
    assert [r.reason for r in results] == ["forged"] and _state(lab) == before


def test_requests_waiting_together_share_one_commit_and_keep_their_own_answers(lab: Lab) -> None:
    import asyncio

    from smig.rctcb.api_ingest import IngestQueue

    monitors = sorted({m for monitors in lab.region.assignment().values() for m in monitors})
    requests = []
    for m in monitors:
        subject = next(s for s, ms in lab.region.assignment().items() if m in ms)
        requests.append(([sign_report(lab.report(m, subject), lab.keys[m]).to_wire().decode(), "junk"], m))
    requests.append(([sign_report(lab.report(monitors[0], "h9"), lab.keys[monitors[0]]).to_wire().decode()], "h2"))
    queue = IngestQueue(lab.region, lambda: T0)
    entries = lab.store.verify_audit()

    async def all_at_once() -> list[list[Any]]:
        return await asyncio.gather(*(queue.submit(wires, agent) for wires, agent in requests))

    answers = asyncio.run(all_at_once())
    assert [[r.reason for r in a] for a in answers[:-1]] == [["", "malformed"]] * len(monitors)
    assert [[r.reason for r in a] for a in answers[-1:]] == [["wrong-agent"]]
    assert queue.groups < len(requests), "requests that waited together were judged together"
    for answer, (_, monitor) in zip(answers[:-1], requests[:-1], strict=True):
        assert answer[0].report is not None and answer[0].report.monitor == monitor
    assert lab.store.verify_audit() > entries
