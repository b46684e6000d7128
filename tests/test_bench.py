"""`smig bench`: the evaluation's quick cases run end to end, so the suite cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SMIG = str(Path(sys.executable).parent / "smig")


def bench(*args: str, cwd: Path | None = None) -> Any:
    done = subprocess.run([SMIG, "bench", *args], capture_output=True, text=True, timeout=600, check=False, cwd=cwd)
    assert done.returncode == 0, f"smig bench {' '.join(args)} failed: {done.stderr}"
    return json.loads(done.stdout) if "--json" in args else done.stdout


def test_placement_plans_every_evacuee_and_times_it_against_first_fit() -> None:
    r = bench("placement", "--quick", "--json")
    assert r["evacuees"] == r["placed"] == 1000 and r["no_capacity"] == 0
    assert 0 < r["send_now"] <= 5, "the region's limit: five migrations sending at once"
    assert r["start_now"] == 5 + 2, "and two more preparing their target meanwhile"
    assert 0 < r["p50_ms"] <= r["p99_ms"] and r["baseline_ms"]["median"] > 0
    assert r["targets_used"] > r["baseline_targets_used"], "SMIG spreads, first fit piles up"


@pytest.mark.qemu
def test_measure_times_a_real_qemu_against_b3sum_over_the_same_bytes() -> None:
    r = bench("measure", "--quick", "--json")
    assert r["elapsed_ms"] > 0 and r["ratio_vs_b3sum"] > 0
    assert r["bytes"] == r["dump_bytes"] > 10 << 20, "b3sum hashes exactly the bytes SMIG measured"
    assert r["b3sum_net_ms"] < r["b3sum_ms"]["median"]
    assert r["meets_goal"] == (r["ratio_vs_b3sum"] >= r["goal_ratio"])


@pytest.mark.qemu
def test_detection_times_every_policy_and_k_from_tamper_to_untrusted(tmp_path: Path) -> None:
    r = bench("detection", "--quick", "--json", "--plot", str(tmp_path / "cdf.png"))
    rows = {(row["interval_s"], row["policy"], row["k"]): row for row in r["results"]}
    judged = [("immediate", 1), ("immediate", 2), ("immediate", 3), ("quorum", 2), ("quorum", 3)]
    assert set(rows) == {(i, p, k) for i in (0.1, 1.0) for p, k in judged}
    for (interval, policy, k), row in rows.items():
        assert row["detected"] == row["trials"] == 10, (interval, policy, k)
        # Detection takes a measurement after the tamper, and never longer than the schedule's
        # longest wait by much: 1.5 intervals, then measuring and judging.
        assert 0 < row["first_mismatch_p50_ms"] <= row["p50_ms"] <= row["p99_ms"] < 1500 * interval + 1000
        assert row["predicted_p50_ms"] < row["predicted_p99_ms"]
    assert not r["rejected_reports"], "every report a region judged was well formed and fresh"
    assert (tmp_path / "cdf.png").stat().st_size > 10_000


def test_the_suite_writes_figures_sections_and_the_goals(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    results = tmp_path / "results"
    bench("all", "--quick", "--only", "placement", "--write", str(doc), "--results", str(results))
    figures = json.loads((results / "placement.json").read_text())
    assert figures["placed"] == 1000 and figures["quick"] is True
    text = doc.read_text()
    assert "kept" in text and "<!-- bench:suite-placement:begin -->" in text and "evacuating 1,000 VMs" in text
    bench("goals", "--results", str(results), "--write", str(doc))
    goals = bench("goals", "--results", str(results), "--json")
    assert any(g["met"] is None and "overhead" in g["goal"] for g in goals), "a benchmark with no figures is said so"
    assert "## Goals: which are met" in doc.read_text()


@pytest.mark.qemu
def test_transient_changes_are_caught_more_often_by_more_monitors_and_compared_with_the_schedule() -> None:
    r = bench("transient", "--quick", "--json")
    rows = {(row["duration_s"], row["k"]): row for row in r["results"]}
    assert set(rows) == {(d, k) for d in (0.1, 0.5) for k in (1, 2, 3)}
    for (d, k), row in rows.items():
        assert row["trials"] == 16 and 0 <= row["caught"] <= row["trials"]
        assert row["lasted_ms"]["median"] >= 1000 * d, "the change lasted at least as long as asked"
        assert row["ci95"][0] <= row["probability"] <= row["ci95"][1]
        assert 0 < row["predicted"] <= 1
        if k > 1:  # the same reports reach every region, and k monitors include the k - 1 before them
            assert row["caught"] >= rows[(d, k - 1)]["caught"], (d, k)


@pytest.mark.qemu
def test_migration_moves_real_guests_and_sees_downtime_twice() -> None:
    r = bench("migration", "--quick", "--json")
    assert {row["case"] for row in r["results"]} == {"256 MiB, idle, plain", "256 MiB, dirty 10 MiB/s, plain"}
    for row in r["results"]:
        for setting in ("smig", "uncapped", "1gbit"):
            f = row[setting]
            assert f["total_ms"]["n"] == 1 and f["total_ms"]["median"] > 0
            assert f["guest_gap_ms"]["n"] == 1, "the guest's heartbeat was seen on both sides of the move"
            assert 0 <= f["qemu_downtime_ms"]["median"] <= f["total_ms"]["median"]
        assert row["ratio_smig_vs_uncapped"] > 0


@pytest.mark.qemu
def test_response_times_the_rctcb_and_a_real_evacuation_against_direct_migrations(tmp_path: Path) -> None:
    r = bench("response", "--quick", "--json", "--plot", str(tmp_path / "breakdown.png"))
    (reaction,) = r["reaction"]
    assert reaction["trials"] == 20 and 0 < reaction["p50_ms"] <= reaction["p99_ms"]
    assert r["meets_reaction_goal"] == (reaction["p99_ms"] < r["goal_reaction_p99_ms"])
    (run,) = r["runs"]
    assert run["vms"] == run["moved"] == run["live"] == run["same_boot"] == 1, run
    assert 0 < run["tamper_to_untrusted_ms"] < run["response_ms"]
    assert 0 < run["evacuation_ms"] < run["response_ms"] and run["direct_ms"] > 0
    assert run["ratio_vs_direct"] == round(run["evacuation_ms"] / run["direct_ms"], 4)
    (vm,) = run["per_vm"]
    phases = [phase for phase, _, _ in vm["segments"]]
    assert phases[:3] == ["detect", "judge", "plan"] and "migrating" in phases, phases
    assert vm["segments"][-1][2] <= run["response_ms"] + 1, "the phases end by the time the VM landed"
    assert (tmp_path / "breakdown.png").stat().st_size > 10_000


@pytest.mark.qemu
def test_overhead_runs_every_workload_with_aim_off_and_on_and_judges_the_goal(tmp_path: Path) -> None:
    r = bench("overhead", "--quick", "--json", "--plot", str(tmp_path / "bars.png"))
    kinds = {k["kind"]: k for k in r["results"]}
    assert set(kinds) == {"idle", "compute", "disk", "net"}
    assert r["all_measurements_matched"], "a healthy guest's QEMU, disk and NIC included, matches the reference"
    assert kinds["net"]["sink_received_bytes"] > 0, "the net guest's stream reached the host's sink"
    for kind, k in kinds.items():
        phases = {p["interval_s"]: p for p in k["phases"]}
        assert set(phases) == {None, 2.0, 1.0, 0.1}
        assert phases[None]["measurements_per_s"] == 0 and phases[None]["score"]["n"] == 7, "off between all"
        assert phases[0.1]["measurements_per_s"] > phases[2.0]["measurements_per_s"], kind
        assert phases[0.1]["aim_cpu_pct"] > 0 and phases[None]["run_queue_wait_pct"] >= 0
        if kind != "idle":
            assert phases[None]["score"]["median"] > 0, f"the {kind} guest made progress"
        for interval in (2.0, 1.0, 0.1):
            row = phases[interval]
            assert row["slowdown_pct"]["n"] == row["cpu_lost_pct"]["n"] == 2
            low, high = row["slowdown_ci95_pct"]
            assert low <= row["slowdown_mean_pct"] <= high
            goal = row["goal_pct"]
            if goal is not None:
                assert row["meets_goal"] == (True if high < goal else False if low >= goal else None)
    assert (tmp_path / "bars.png").stat().st_size > 10_000
