"""Response time: how fast SMIG gets VMs off a tampered host, against the same migrations done directly.

Two parts, in one run:

1. **The RC-TCB's reaction** (:mod:`smig.bench.reaction`): UNTRUSTED committed to the first
   migration command, 100 trials (20 with ``--quick``) per number of guests on the falling host.
   Goal: p99 under 20 ms.
2. **End to end, in the lab** (:func:`smig.lab.demo.run_demo`): a region of four hosts (network
   namespaces, an agent each, the RC-TCB, TLS migrations across the bridge), 1, 2, 4 and 8 guests
   of 256 MiB all on the host that is then tampered with, idle and dirtying; tamper to the last VM
   running on a trusted host, read from the audit log and the guests' heartbeats. SMIG's
   evacuation (its first migration command to its last VM running) is compared with the same
   number of the same guests migrated directly (the QEMU driver's ``live_migrate`` straight over
   QMP, TLS and SMIG's migration parameters, two at a time as SMIG's per-source limit allows, no
   RC-TCB, agents or network in between), on loopback, after the lab's guests were stopped but
   while its agents and RC-TCB still run (measuring each other), so both run under the same
   load. Goal: SMIG within 1.1x of the direct migrations' own time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from smig.bench.plots import pyplot, save
from smig.bench.reaction import run_reaction
from smig.bench.stats import Progress, machine, ms_text, ratio
from smig.hypervisor import process
from smig.hypervisor.migration import live_migrate
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.lab import region
from smig.lab.demo import Watch, run_demo
from smig.model import MigrationParams, VMSpec
from smig.paths import smig_cache
from smig.pki import ensure_local_migration_tls
from smig.rctcb.placement import PlacementConfig

FULL_VMS = (1, 2, 4, 8)
QUICK_VMS = (1,)
FULL_LOADS = (0, 10)
QUICK_LOADS = (0,)
FULL_TRIALS = 100
QUICK_TRIALS = 20
MEMORY_MIB = 256
GOAL_REACTION_P99_MS = 20.0
GOAL_RATIO = 1.1


def _smig_run(vms: int, dirty: int, say: Progress) -> dict[str, Any]:
    """The lab's evacuation of ``vms`` guests; then the lab's guests are stopped and, while its
    agents and RC-TCB still run (the agents measuring each other), as many guests are booted and
    migrated directly: the same work under the same load."""
    lab = f"resp{vms}d{dirty}"  # a lab name: 1-8 lowercase letters or digits
    try:
        figures = _evacuate(lab, vms, dirty, say)
        _stop_guests(lab)
        say(f"{vms} guest(s), dirty {dirty}: the same migrations directly, the lab still up")
        figures["direct_ms"] = round(asyncio.run(_direct(vms, dirty)), 1)
    finally:
        region.down(lab)
    return figures


def _stop_guests(lab: str, timeout_s: float = 10.0) -> None:
    """Stop the QEMU processes of the lab's guests (wherever they run now), and wait for them."""
    state = region.load(lab)
    pids = [pid for host in state.hosts for pid in region.hypervisor_pids(state, host)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(process.alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _evacuate(lab: str, vms: int, dirty: int, say: Progress) -> dict[str, Any]:
    result = run_demo(
        name=lab,
        hosts=4,
        vms_per_host=vms,
        attack="patch",
        policy="quorum",
        memory_mib=MEMORY_MIB,
        dirty_mbps=dirty,
        interval_s=1.0,
        timeout_s=300.0,
        keep=True,
        progress=lambda m: say(f"{vms} guest(s), dirty {dirty}: {m}"),
        watch=Watch(),
        only_attacked_runs_vms=True,
    )
    moved = result.vms
    first_command = min(
        (s["at"] for v in moved for s in v["steps"] if s["kind"] != "migration.planned"), default=None
    )  # the first step past planning is the first command an agent receives
    untrusted = min((v["untrusted_at"] for v in moved if v["untrusted_at"] is not None), default=None)
    landed = [v["migration_completed_at"] for v in moved]
    done = all(x is not None for x in landed) and bool(landed)
    last = max(x for x in landed if x is not None) if done else None
    return {
        "response_ms": result.response_time_ms,
        "evacuation_ms": round((last - first_command) * 1000, 1) if last and first_command else None,
        "untrusted_to_first_command_ms": round((first_command - untrusted) * 1000, 1)
        if first_command and untrusted
        else None,
        "tamper_to_untrusted_ms": round((untrusted - moved[0]["tamper_at"]) * 1000, 1) if untrusted else None,
        "live": sum(v["mode"] == "live" for v in moved),
        "moved": sum(v["state"] == "done" for v in moved),
        "vms": len(moved),
        "same_boot": sum(v["boot_id_before"] == v["boot_id_after"] for v in moved),
        "downtime_ms": [v["downtime_ms"] for v in moved],
        "per_vm": [
            {
                "vm": v["name"],
                "mode": v["mode"],
                "segments": breakdown(v),
                # Why a move left the live path: the reasons its fencing and restart steps carry.
                "why_not_live": sorted(
                    {s["reason"] for s in v["steps"] if s["kind"] in _OFF_THE_LIVE_PATH and s["reason"]}
                ),
            }
            for v in moved
        ],
    }


_OFF_THE_LIVE_PATH = ("migration.fencing", "migration.restarting", "migration.failed")


def breakdown(vm: dict[str, Any]) -> list[tuple[str, float, float]]:
    """Where one VM's response time went, as (phase, start, end) in ms after the tamper: detection
    (the first accepted mismatch), judging (to UNTRUSTED), then each step of its order, named after
    the state it spent that time in (a demo timeline's VM, :func:`smig.lab.demo.timeline`)."""
    t0 = vm["tamper_at"]
    marks = [("detect", vm["detected_at"]), ("judge", vm["untrusted_at"])]
    steps = vm["steps"]
    if steps:
        marks.append(("plan", steps[0]["at"]))
    marks += [(a["kind"].split(".", 1)[1], b["at"]) for a, b in itertools.pairwise(steps)]
    out = []
    start = t0
    for phase, end in marks:
        if end is None:
            continue
        out.append((phase, round((start - t0) * 1000, 1), round((end - t0) * 1000, 1)))
        start = end
    return out


async def _direct(vms: int, dirty: int) -> float:
    """The same guests migrated straight through the driver, two at a time: ms from the first
    migration's start to the last one's end."""
    limit = PlacementConfig().max_outbound_per_host
    with tempfile.TemporaryDirectory(prefix="smig-bench-direct-") as tmp:
        home = Path(tmp)
        driver = QemuDriver(QemuConfig(home=home, cache=smig_cache(), tls=ensure_local_migration_tls(home)))
        specs = [VMSpec(name=f"direct-{i}", memory_mib=MEMORY_MIB, dirty_mbps=dirty) for i in range(vms)]
        params = MigrationParams(tls=True, timeout_s=300)
        gate = asyncio.Semaphore(limit)
        try:
            await asyncio.gather(*(driver.launch(s) for s in specs))
            await asyncio.gather(*(driver.wait_heartbeat(s.name, 20) for s in specs))

            async def move(spec: VMSpec) -> None:
                async with gate:
                    await live_migrate(driver, driver, spec.name, params)

            started = time.perf_counter()
            await asyncio.gather(*(move(s) for s in specs))
            return (time.perf_counter() - started) * 1000
        finally:
            await asyncio.gather(*(driver.stop(s.name) for s in specs), return_exceptions=True)


# The figures of one end-to-end case that repeats summarise (median and range).
REPEATED = ("tamper_to_untrusted_ms", "untrusted_to_first_command_ms", "evacuation_ms", "direct_ms",
            "ratio_vs_direct", "response_ms")  # fmt: skip


def _case(vms: int, dirty: int, repeats: int, say: Progress) -> dict[str, Any]:
    """One end-to-end case, ``repeats`` times, each in a fresh lab. The figures are the medians over
    the repeats, with every repeat's value under ``samples``; the per-VM breakdown is the first
    repeat's; ``live``, ``moved`` and ``moves`` count over all of them."""
    done = []
    for k in range(repeats):
        if repeats > 1:
            say(f"{vms} guest(s), dirty {dirty}: repeat {k + 1} of {repeats}")
        smig = _smig_run(vms, dirty, say)
        smig["ratio_vs_direct"] = ratio(smig["evacuation_ms"], smig["direct_ms"]) if smig["evacuation_ms"] else None
        done.append(smig)
    case: dict[str, Any] = {"vms": vms, "dirty_mbps": dirty, **done[0], "repeats": repeats}
    case["samples"] = {key: [d[key] for d in done] for key in REPEATED}
    for key in REPEATED:
        values = [x for x in case["samples"][key] if x is not None]
        # A repeat without the figure (a move that never landed) leaves the case without it.
        case[key] = statistics.median(values) if len(values) == repeats else None
    case["live"] = sum(d["live"] for d in done)
    case["moved"] = sum(d["moved"] for d in done)
    case["moves"] = sum(d["vms"] for d in done)
    case["downtime_ms"] = [x for d in done for x in d["downtime_ms"]]
    # Every repeat's moves that left the live path, and why (the breakdown keeps the first's only).
    case["off_path"] = [
        {"repeat": k + 1, "vm": v["vm"], "mode": v["mode"], "why": v["why_not_live"]}
        for k, d in enumerate(done)
        for v in d.get("per_vm", [])
        if v.get("why_not_live") or v.get("mode") != "live"
    ]
    return case


def run(quick: bool = False, progress: Progress | None = None, repeats: int = 1) -> dict[str, Any]:
    """Raises what the lab raises (LabError, LaunchError, ...) when a region cannot come up."""
    say = progress or (lambda _: None)
    vm_counts = QUICK_VMS if quick else FULL_VMS
    loads = QUICK_LOADS if quick else FULL_LOADS
    trials = QUICK_TRIALS if quick else FULL_TRIALS
    say(f"the RC-TCB's reaction: {trials} trials for each of {vm_counts} guests")
    reaction = run_reaction(trials, vm_counts)
    runs = [_case(vms, dirty, repeats, say) for dirty in loads for vms in vm_counts]
    worst = max((r["p99_ms"] for r in reaction), default=None)
    ratios = [r["ratio_vs_direct"] for r in runs if r["ratio_vs_direct"] is not None]
    return {
        "name": "response",
        "memory_mib": MEMORY_MIB,
        "repeats": repeats,
        "reaction": reaction,
        "runs": runs,
        "goal_reaction_p99_ms": GOAL_REACTION_P99_MS,
        "meets_reaction_goal": worst is not None and worst < GOAL_REACTION_P99_MS,
        "goal_ratio": GOAL_RATIO,
        "meets_ratio_goal": bool(ratios) and len(ratios) == len(runs) and max(ratios) <= GOAL_RATIO,
        "machine": machine(),
    }


PHASE_COLOURS = {
    "detect": "#9ecae1",
    "judge": "#3182bd",
    "plan": "#fdae6b",
    "planned": "#fdd0a2",
    "preparing": "#e6550d",
    "ready": "#fd8d3c",
    "migrating": "#31a354",
    "completing": "#a1d99b",
    "fencing": "#756bb1",
    "restarting": "#de2d26",
}


def plot(r: dict[str, Any], path: Path) -> Path:
    """The response-time breakdown per VM, one panel per load for the largest number of guests."""
    plt = pyplot()

    most = max((x["vms"] for x in r["runs"]), default=0)
    runs = [x for x in r["runs"] if x["vms"] == most and x.get("per_vm")]
    fig, axes = plt.subplots(len(runs) or 1, 1, figsize=(7.5, 1.0 + 0.35 * most * max(1, len(runs))), squeeze=False)
    seen: set[str] = set()
    for ax, run_ in zip(axes[:, 0], runs, strict=False):
        for row, vm in enumerate(run_["per_vm"]):
            for phase, start, end in vm["segments"]:
                label = None if phase in seen else phase
                seen.add(phase)
                ax.barh(row, (end - start) / 1000, left=start / 1000, color=PHASE_COLOURS.get(phase, "grey"),
                        label=label)  # fmt: skip
        ax.set_yticks(range(len(run_["per_vm"])), [f"{v['vm']} ({v['mode']})" for v in run_["per_vm"]], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{most} guests, {run_['dirty_mbps']} MiB/s dirtied each", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds after the tamper")
    fig.legend(loc="lower center", ncol=5, fontsize=7, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save(fig, path)


def _cell(case: dict[str, Any], key: str) -> str:
    """A table cell: the case's figure, with the range over its repeats when it was repeated."""
    text = (lambda v: f"{v:.2f}") if key == "ratio_vs_direct" else ms_text
    value = case[key]
    samples = [v for v in case.get("samples", {}).get(key, []) if v is not None]
    if value is None or len(samples) < 2:
        return "-" if value is None else text(value)
    return f"{text(value)} ({text(min(samples))}-{text(max(samples))})"


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "### Response time: tamper to every VM on a trusted host",
        "",
        "The RC-TCB's reaction, UNTRUSTED committed to the first migration command (in process, real "
        "region and evacuation loop, SQLite on disk, in-memory agents):",
        "",
        "| guests on the host | trials | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|",
    ]
    for x in r["reaction"]:
        lines.append(f"| {x['vms']} | {x['trials']} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} |")
    met = "met" if r["meets_reaction_goal"] else "not met"
    lines += [
        "",
        f"**Goal: p99 under {r['goal_reaction_p99_ms']:.0f} ms: {met}.**",
        "",
        f"End to end in the lab (4 hosts, {r['memory_mib']} MiB guests all on the tampered host, quorum policy, "
        "TLS migrations), against the same guests migrated directly on loopback in the same run:",
        "",
        "| guests | dirty (MiB/s) | tamper to UNTRUSTED | UNTRUSTED to first command | SMIG evacuation | direct "
        "| ratio | tamper to last VM running | moved live |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["runs"]:
        cells = [_cell(x, key) for key in REPEATED]
        lines.append(
            f"| {x['vms']} | {x['dirty_mbps']} | {' | '.join(cells)} | {x['live']}/{x.get('moves', x['vms'])} |"
        )
    if r.get("repeats", 1) > 1:
        lines += ["", f"Each case {r['repeats']} times, each in a fresh lab: median (min-max) over the repeats."]
    met = "met" if r["meets_ratio_goal"] else "not met"
    lines += ["", f"**Goal: SMIG's evacuation within {r['goal_ratio']}x of the direct migrations: {met}.**"]
    off_path = [
        f"{x['vms']} guests, {x['dirty_mbps']} MiB/s, repeat {v['repeat']}: {v['vm']} ({v['mode']}): "
        f"{'; '.join(v['why']) or 'no reason recorded'}"
        for x in r["runs"]
        for v in x.get("off_path", [])
    ]
    if off_path:
        lines += ["", "Moves that left the live path, and why (from the audit log):", ""]
        lines += [f"- {line}" for line in off_path]
    return "\n".join(lines)
