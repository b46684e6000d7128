"""The demo's HTML report (``smig demo --report DIR``): the timeline table and two plots.

``response.png`` breaks each evacuated VM's response time into its steps (detection, the
second opinion, the decision, preparing the target, the live migration); ``region.png`` shows
where every VM ran before the tamper and after, and each host's trust state at the end.
Plots are drawn with matplotlib's non-interactive Agg backend: no display is needed.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STEPS = (
    ("tamper_at", "detected_at", "detection", "#4c72b0"),
    ("detected_at", "untrusted_at", "confirmation", "#8172b2"),
    ("untrusted_at", "decided_at", "decision", "#c44e52"),
    ("decided_at", "migration_started_at", "preparing the target", "#dd8452"),
    ("migration_started_at", "migration_completed_at", "live migration", "#55a868"),
)
STATE_COLOURS = {"trusted": "#55a868", "suspect": "#dd8452", "untrusted": "#c44e52", "unknown": "#8c8c8c"}


def _response_plot(vms: list[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.9 + 0.5 * len(vms)), layout="constrained")
    for row, vm in enumerate(vms):
        for start, end, label, colour in STEPS:
            if vm.get(start) is None or vm.get(end) is None:
                continue
            left = (vm[start] - vm["tamper_at"]) * 1000
            width = max((vm[end] - vm[start]) * 1000, 0.5)
            ax.barh(row, width, left=left, color=colour, label=label if row == 0 else None)
    ax.set_yticks(range(len(vms)), [f"{vm['name']} → {vm.get('target') or '?'}" for vm in vms])
    ax.invert_yaxis()
    ax.set_xlabel("ms after the tamper")
    fig.suptitle("Response time, step by step")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5, fontsize="small", frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _region_plot(
    hosts: list[Mapping[str, str]], before: Mapping[str, str], after: Mapping[str, str], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [h["id"] for h in hosts]
    counts_before = [sum(1 for h in before.values() if h == name) for name in names]
    counts_after = [sum(1 for h in after.values() if h == name) for name in names]
    colours = [STATE_COLOURS.get(h["state"], "#8c8c8c") for h in hosts]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    axes[0].bar(names, counts_before, color="#4c72b0")
    axes[0].set_title("VMs per host, before the tamper")
    # After: each host's bar in the colour of its trust state, the state under its name (an
    # untrusted host has no bar left to colour).
    axes[1].bar(names, counts_after, color=colours)
    axes[1].set_title("after, by trust state")
    axes[1].set_xticks(range(len(names)), [f"{h['id']}\n{h['state']}" for h in hosts])
    for label, colour in zip(axes[1].get_xticklabels(), colours, strict=True):
        label.set_color(colour)
    for ax in axes:
        ax.yaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: Mapping[str, Any], directory: Path) -> Path:
    """Write ``index.html``, ``response.png`` and ``region.png`` into ``directory``; the HTML's path."""
    directory.mkdir(parents=True, exist_ok=True)
    vms = list(result["vms"])
    _response_plot(vms, directory / "response.png")
    _region_plot(
        result["hosts"], result.get("placement_before", {}), result.get("placement_after", {}), directory / "region.png"
    )
    rows = []
    for vm in vms:
        zero = vm["tamper_at"]

        def ms(key: str, vm: Mapping[str, Any] = vm, zero: float = zero) -> str:
            return "-" if vm.get(key) is None else f"{(vm[key] - zero) * 1000:.0f}"

        cells = [
            vm["name"], vm["source"], vm.get("target") or "-", vm["mode"], ms("detected_at"), ms("untrusted_at"),
            ms("decided_at"), ms("migration_started_at"), ms("migration_completed_at"),
            "-" if vm.get("downtime_ms") is None else f"{vm['downtime_ms']:.0f}",
            f"{vm.get('heartbeat_before')} → {vm.get('heartbeat_after')}",
            "same" if vm.get("boot_id_before") and vm.get("boot_id_before") == vm.get("boot_id_after") else "new",
        ]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    heads = [
        "VM",
        "from",
        "to",
        "mode",
        "mismatch",
        "UNTRUSTED",
        "decided",
        "moving",
        "running",
        "down",
        "heartbeat",
        "boot id",
    ]
    states = ", ".join(f"{h['id']}: {h['state']}" for h in result["hosts"])
    response = result.get("response_time_ms")
    title = html.escape(f"{result['attacked_host']} tampered ({result['attack']}, policy {result['policy']})")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>SMIG demo: {html.escape(result["attacked_host"])} tampered</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}</style></head><body>
<h1>{title}</h1>
<p>Response time, tamper to the last VM running on a trusted host:
<b>{"-" if response is None else f"{response:.0f} ms"}</b>. Hosts at the end: {html.escape(states)}.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in heads)}</tr>{"".join(rows)}</table>
<p>Times in ms after the tamper, from the RC-TCB's audit log; <i>down</i> is the longest pause in the
guest's own heartbeat, less one period.</p>
<img src="response.png" alt="response time by step"><img src="region.png" alt="the region before and after">
<p><small>written {time.strftime("%Y-%m-%d %H:%M:%S")}</small></p>
</body></html>
"""
    out = directory / "index.html"
    out.write_text(page)
    return out
