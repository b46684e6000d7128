"""RC-TCB ingest figures: signed reports ingested per second over HTTPS with mutual TLS, and the latency.

The same load as ``smig bench ingest`` (``smig.rctcb.loadgen``): a temporary region of 5,000 hosts
(500 with ``--quick``) enrolled through the API of a real ``smig rctcb serve`` started as a separate
process; every monitor's MATCH reports signed before timing, then sent by concurrent clients, one
agent's reports over several rounds per request, each over that agent's certificate; then the same
requests to ``/v1/noop`` (same TLS and JSON parsing, nothing verified) as the baseline, in the same
run. Goal: at least 10,000 subject verdicts per second on a 2-core machine.

Prints the figures; writes them raw to ``--json`` (default ``bench/results/ingest.json``);
``--write FILE`` replaces this benchmark's section of ``docs/BENCHMARKS.md``.

    .venv/bin/python bench/ingest.py [--quick] [--write docs/BENCHMARKS.md] [--json bench/results/ingest.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from smig.bench.docs import write_section
from smig.rctcb.loadgen import GOAL_PER_S, QUICK, Connections, IngestResult, LoadConfig, run_ingest

SECTION = "ingest"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def render(r: IngestResult, command: str, raw: str) -> str:
    f: dict[str, Any] = r.to_json()
    c = r.config
    met = "met" if f["meets_goal"] else "not met"
    refused = f"**{r.ingest.rejected} reports refused: {r.ingest.reasons}**" if r.ingest.rejected else "none refused"
    lines = [
        "## RC-TCB: signed reports ingested per second",
        "",
        f"Command: `{command}`  ",
        f"Date: {r.date}. Machine: nproc {r.cpus}, {_cpu_model()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}. Load average at the end: {os.getloadavg()[0]:.2f}.  ",
        f"A region of {c.hosts} hosts enrolled (vouched, TRUSTED) through the API of `smig rctcb serve` in its own "
        f"process; each host measured by 2 monitors. {c.clients} concurrent clients (asyncio; HTTP/1.1 written "
        "and read by `smig.rctcb.loadgen_http`, as `wrk` does) in another "
        f"process send {r.ingest.reports} MATCH reports (signed before timing, {r.report_bytes} bytes each on the "
        f"wire, {c.targets} target digests) of {r.monitors} monitors, up to {r.rounds} rounds each, "
        f"{r.batch_size} a request: one agent's reports over {c.rounds_per_batch} rounds, over that agent's own "
        "certificate. Connections: "
        f"{c.connections.value} ({r.ingest.tls_handshakes} TLS handshakes during the timed phase; the service keeps "
        "an idle connection 75 s, the clients 120 s). Signatures: "
        f"{'one per request (the batch of one agent, smig.aim.report_batch)' if c.one_signature else 'one per report'}."
        " Then the same requests to `/v1/noop` (same TLS and JSON parsing, nothing "
        "verified), back to back in the same run. Latency: one request, from send to full response. The "
        "policy's freshness window is set to a day here, so that hosts do not turn UNKNOWN while 5,000 enrol; "
        "with the default 10 s an agent would have to send at least every few seconds, in smaller batches.",
        "",
        "| endpoint | requests | reports | seconds | reports/s | p50 (ms) | p99 (ms) | max (ms) | service CPU (s) "
        "| client CPU (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in (r.ingest, r.baseline):
        lines.append(
            f"| `{p.endpoint}` | {p.requests} | {p.reports} | {p.wall_s:.2f} | {p.per_s:,.0f} | {p.p50_ms:.1f} "
            f"| {p.p99_ms:.1f} | {p.max_ms:.1f} | {p.server_cpu_s:.1f} | {p.client_cpu_s:.1f} |"
        )
    lines += [
        "",
        f"**Goal: {GOAL_PER_S:,.0f} subject verdicts/s: {met}** ({f['verdicts_per_s']:,.0f}/s, {refused}; ratio to "
        f"the no-op baseline {f['ratio']}). Set-up, not timed: enrolling {c.hosts} hosts {r.enrol_s:.1f} s over "
        f"{c.enrol_connections} connections, opening the agents' connections {r.connect_s:.1f} s, signing "
        f"{r.sign_s:.1f} s; calibration pass {r.calibration.per_s:,.0f} reports/s. Clients ahead of the plan the "
        f"reports were stamped for waited {r.ingest.gate_wait_s:.1f} s in all. "
        f"Raw figures: `{raw}`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="500 hosts and an 8 s timed phase (under a minute)")
    ap.add_argument("--hosts", type=int, help="hosts in the region (default 5000; 500 with --quick)")
    ap.add_argument("--clients", type=int, default=LoadConfig.clients, help="concurrent clients (requests in flight)")
    ap.add_argument("--rounds-per-batch", type=int, default=10, help="rounds of one agent's reports per request")
    ap.add_argument("--duration", type=float, help="seconds the timed phase should last (default 30; 8 quick)")
    ap.add_argument("--connections", choices=[c.value for c in Connections], default=Connections.PERSISTENT.value)
    ap.add_argument("--targets", type=int, default=0, help="target digests in each report")
    ap.add_argument("--write", type=Path, help="replace this benchmark's section in this Markdown file")
    ap.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parent / "results" / "ingest.json", help="raw figures"
    )
    args = ap.parse_args()
    base = QUICK if args.quick else LoadConfig()
    config = replace(
        base,
        hosts=args.hosts or base.hosts,
        clients=args.clients,
        rounds_per_batch=args.rounds_per_batch,
        duration_s=args.duration or base.duration_s,
        connections=Connections(args.connections),
        targets=args.targets,
    )
    command = " ".join([".venv/bin/python bench/ingest.py", *sys.argv[1:]])
    result = asyncio.run(run_ingest(config, progress=lambda m: print(f"… {m}", file=sys.stderr, flush=True)))
    raw = os.path.relpath(args.json.resolve(), Path(__file__).resolve().parent.parent)
    body = render(result, command, raw if not raw.startswith("..") else str(args.json))
    print(body)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, **result.to_json()}, indent=2) + "\n")
    if args.write:
        write_section(args.write, SECTION, body)
    if result.ingest.rejected:
        print(f"! {result.ingest.rejected} reports were refused: {result.ingest.reasons}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
