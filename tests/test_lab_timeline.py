"""The demo's timeline (pure): each VM's story is read from the RC-TCB's audit log and the guest's
heartbeats, not from what the demo thought it saw."""

from __future__ import annotations

from typing import Any

from smig.lab.demo import Beat, timeline

T = 1_800_000_000.0


def entry(at: float, kind: str, subject: str, **body: Any) -> dict[str, Any]:
    return {"at": T + at, "kind": kind, "subject": subject, "body": body}


AUDIT = [
    entry(-5, "report.accepted", "h1", verdict="mismatch", monitor="h3"),  # before the tamper: not it
    entry(0.4, "report.accepted", "h1", verdict="match", monitor="h2"),
    entry(0.9, "report.accepted", "h1", verdict="mismatch", monitor="h2"),
    entry(1.3, "report.accepted", "h1", verdict="mismatch", monitor="h3"),
    entry(1.3, "trust.changed", "h1", old="suspect", new="untrusted"),
    entry(1.31, "evacuation.planned", "h1", orders=2),
    entry(1.32, "migration.preparing", "a", target="h2"),
    entry(1.4, "migration.migrating", "a", target="h2"),
    entry(3.4, "migration.done", "a", target="h2"),
    entry(1.4, "migration.migrating", "b", target="h3"),
    entry(9.0, "migration.fencing", "b", target="h3"),
    entry(9.5, "migration.restarting", "b", target="h3"),
    entry(14.0, "migration.done", "b", target="h3"),
]


def beats(host_after: str, boot_after: str, pause: tuple[float, float]) -> list[Beat]:
    out = []
    t, n = -2.0, 0
    while t < 18:
        if not pause[0] < t < pause[1]:
            out.append(
                Beat(
                    T + t,
                    n,
                    "boot-1" if t < pause[0] or boot_after == "boot-1" else boot_after,
                    "h1" if t < pause[0] else host_after,
                )
            )
            n += 1
        t += 0.1
    return out


def test_each_vm_gets_its_steps_downtime_and_heartbeats() -> None:
    seen = {"a": beats("h2", "boot-1", (3.0, 3.35)), "b": beats("h3", "boot-2", (8.9, 15.0))}
    a, b = timeline("h1", ["a", "b"], T, AUDIT, seen)
    assert (a["detected_at"], a["untrusted_at"], a["decided_at"]) == (T + 0.9, T + 1.3, T + 1.31)
    assert (a["migration_started_at"], a["migration_completed_at"], a["target"], a["mode"]) == (
        T + 1.4,
        T + 3.4,
        "h2",
        "live",
    )
    assert a["boot_id_before"] == a["boot_id_after"] == "boot-1" and a["heartbeat_after"] > a["heartbeat_before"]
    assert 250 < a["downtime_ms"] < 450  # three beats missing: a 0.4 s gap, less one period
    assert (b["mode"], b["target"], b["boot_id_after"]) == ("restart", "h3", "boot-2")


def test_a_vm_that_did_not_move_says_so() -> None:
    (c,) = timeline("h1", ["c"], T, AUDIT, {})
    assert (c["target"], c["migration_completed_at"], c["state"], c["downtime_ms"]) == (None, None, "not moved", None)
