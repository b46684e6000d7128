"""The response benchmark's breakdown of one VM's response time, from a demo timeline."""

from __future__ import annotations

from typing import Any

from smig.bench.response import breakdown


def test_each_phase_runs_from_the_end_of_the_one_before_in_ms_after_the_tamper() -> None:
    vm = {
        "tamper_at": 100.0,
        "detected_at": 100.4,
        "untrusted_at": 100.5,
        "steps": [
            {"kind": "migration.planned", "at": 100.52},
            {"kind": "migration.preparing", "at": 100.6},
            {"kind": "migration.migrating", "at": 101.6},
            {"kind": "migration.completing", "at": 103.0},
            {"kind": "migration.done", "at": 103.1},
        ],
    }
    assert breakdown(vm) == [
        ("detect", 0.0, 400.0),
        ("judge", 400.0, 500.0),
        ("plan", 500.0, 520.0),
        ("planned", 520.0, 600.0),
        ("preparing", 600.0, 1600.0),
        ("migrating", 1600.0, 3000.0),
        ("completing", 3000.0, 3100.0),
    ]


def test_a_vm_never_ordered_shows_only_what_happened() -> None:
    vm: dict[str, Any] = {"tamper_at": 5.0, "detected_at": 5.2, "untrusted_at": None, "steps": []}
    assert breakdown(vm) == [("detect", 0.0, 200.0)]
