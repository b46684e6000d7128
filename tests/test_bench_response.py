"""The response benchmark's breakdown of one VM's response time, from a demo timeline, and its
figures over repeated runs."""

from __future__ import annotations

from typing import Any

import pytest

from smig.bench import response
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


def test_repeated_cases_give_medians_with_every_repeat_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = iter(
        [
            {"evacuation_ms": 3000.0, "direct_ms": 2000.0, "live": 2, "vms": 2, "moved": 2},
            {"evacuation_ms": 5000.0, "direct_ms": 2500.0, "live": 1, "vms": 2, "moved": 2},
            {"evacuation_ms": 4000.0, "direct_ms": 4000.0, "live": 2, "vms": 2, "moved": 2},
        ]
    )

    def fake_run(vms: int, dirty: int, say: object) -> dict[str, object]:
        f = next(figures)
        return {
            **f,
            "tamper_to_untrusted_ms": 500.0,
            "untrusted_to_first_command_ms": 5.0,
            "response_ms": f["evacuation_ms"] + 600,
            "same_boot": 2,
            "downtime_ms": [100, 120],
            "per_vm": [{"vm": "vm1", "mode": "live", "why_not_live": []}]
            + ([{"vm": "vm2", "mode": "restart", "why_not_live": ["fenced"]}] if f["live"] == 1 else []),
        }

    monkeypatch.setattr(response, "_smig_run", fake_run)
    case = response._case(2, 10, 3, lambda _: None)
    assert case["samples"]["ratio_vs_direct"] == [1.5, 2.0, 1.0]
    assert case["ratio_vs_direct"] == 1.5 and case["evacuation_ms"] == 4000.0 and case["direct_ms"] == 2500.0
    assert (case["live"], case["moves"], case["vms"]) == (5, 6, 2)
    assert len(case["downtime_ms"]) == 6
    table = response.markdown(
        {"reaction": [], "meets_reaction_goal": True, "goal_reaction_p99_ms": 20, "memory_mib": 256, "runs": [case],
         "meets_ratio_goal": False, "goal_ratio": 1.1, "repeats": 3}
    )  # fmt: skip
    assert (
        "| 2 | 10 | 500 (500-500) | 5 (5-5) | 4,000 (3,000-5,000) | 2,500 (2,000-4,000) | 1.50 (1.00-2.00) |" in table
    )
    assert "5/6 |" in table and "3 times, each in a fresh lab" in table
    assert "- 2 guests, 10 MiB/s, repeat 2: vm2 (restart): fenced" in table, "every repeat's off-path moves are listed"
