"""``smig bench``: load SMIG's services the way a region would, over the real stack, and print the figures."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.markdown import Markdown
from rich.table import Table

from smig.bench.stats import machine
from smig.cli.common import emit_json, err, fail, out
from smig.errors import SmigError
from smig.rctcb.loadgen import GOAL_PER_S, QUICK, Connections, IngestResult, LoadConfig, run_ingest

app = typer.Typer(
    help="SMIG's evaluation: each benchmark prints its figures, its goal and a baseline measured in the same run. "
    "`make bench` runs them all and rewrites docs/BENCHMARKS.md.",
    no_args_is_help=True,
)

_QUICK = typer.Option(False, "--quick", help="A few small cases: the whole benchmark in about a minute.")
_JSON = typer.Option(False, "--json", help="Print one JSON object of the figures (for scripts).")


def _run(name: str, quick: bool, as_json: bool, plot: Path | None = None, **options: Any) -> dict[str, Any]:
    """Run ``smig.bench.<name>`` (with ``options``), print its figures (Markdown, or JSON), draw its
    plot, return them."""
    module = importlib.import_module(f"smig.bench.{name}")
    runner: Callable[..., dict[str, Any]] = module.run
    before = machine()  # the load average the run started under, not the one it left
    try:
        result = runner(quick=quick, progress=lambda m: err.print(f"[dim]… {m}[/dim]"), **options)
        result["machine"] = before
    except SmigError as e:
        fail(e.message)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    if as_json:
        emit_json(result)
    else:
        out.print(Markdown(module.markdown(result)))
    if plot is not None:
        err.print(f"[dim]… plot written to {module.plot(result, plot)}[/dim]")
    return result


@app.command("measure")
def measure(quick: bool = _QUICK, as_json: bool = _JSON) -> None:
    """Time AIM's measurement of one QEMU process against b3sum over the same bytes.

    A bare QEMU (-S, no guest) is measured with SMIG's defaults; the code it hashes is dumped to
    /dev/shm and hashed by b3sum (all threads, one thread), interleaved, in the same run.
    JSON: elapsed_ms (median), ratio_vs_b3sum (b3sum's time net of its process start / SMIG's),
    bytes, and the spreads. Goal: ratio_vs_b3sum at least 0.8.
    """
    _run("measure", quick, as_json)


@app.command("detection")
def detection(
    quick: bool = _QUICK,
    as_json: bool = _JSON,
    plot: Path | None = typer.Option(None, "--plot", help="Also draw the latency CDFs into this PNG."),
) -> None:
    """Time tamper -> first verified mismatch -> UNTRUSTED, trial after trial, on real QEMU processes.

    Two bare QEMU subjects, three monitors each (SMIG's monitor loop, randomised schedules), their
    signed reports judged by real regions: immediate for k = 1, 2, 3 and quorum for k = 2, 3 (the
    second opinion measured on request, as the RC-TCB asks for it). Each trial flips one byte of
    QEMU's code at a random moment and restores it once every region decided. 100 trials per mean
    interval (0.1, 0.5, 1, 2 s); --quick: 10 trials at 0.1 and 1 s. JSON: per interval, policy and
    k, p50_ms and p99_ms of tamper -> UNTRUSTED, the first mismatch's, and the schedule's
    prediction. Goals: at 1 s p99 under 1.2 s (immediate) and 1.5 s (quorum); at 0.1 s under 0.25 s.
    """
    _run("detection", quick, as_json, plot)


@app.command("transient")
def transient(
    quick: bool = _QUICK,
    as_json: bool = _JSON,
    plot: Path | None = typer.Option(None, "--plot", help="Also draw probability against duration into this PNG."),
) -> None:
    """Measure how likely a change that restores itself after d seconds is to be caught.

    The set-up of `smig bench detection` at a mean interval of 1 s, immediate policy, k = 1, 2, 3:
    one byte of QEMU's code flipped at a random moment and restored d seconds later (0.05 to
    1.5 s; --quick: 0.1 and 0.5 s). JSON: per duration and k, the rate caught with its 95% Wilson
    interval and the schedule's predicted probability. Goal: the prediction inside the interval.
    """
    _run("transient", quick, as_json, plot)


@app.command("migration")
def migration(quick: bool = _QUICK, as_json: bool = _JSON) -> None:
    """Time live migrations against guest RAM, dirty rate, TLS and link speed; both downtimes.

    Freshly booted guests (256 MiB, 1 GiB, 2 GiB; idle and writing 10 MiB/s; plain and TLS; --quick:
    256 MiB plain), each moved once on loopback with SMIG's defaults, uncapped (the baseline) and
    over a modelled 1 Gbit/s link. Downtime as QEMU reports it and as the guest sees it (the gap
    in its heartbeat), with how far the guest's clock moved across that gap.
    """
    _run("migration", quick, as_json)


@app.command("overhead")
def overhead(
    quick: bool = _QUICK,
    as_json: bool = _JSON,
    plot: Path | None = typer.Option(None, "--plot", help="Also draw the slowdown bars into this PNG."),
) -> None:
    """Measure how much AIM slows the guests of the host it measures: compute, disk, network, idle.

    One guest per workload (integer mix; O_DIRECT 1 MiB blocks on a virtio-blk disk; a TCP stream
    through virtio-net to a sink on 127.0.0.1; a 10 ms timer), its QEMU measured by the RC-TCB's
    default two monitors with SMIG's defaults, on the same cores. Phases alternate AIM off with a
    mean interval of 2 s, 1 s or 0.1 s, each compared with the off phases beside it (10 repeats of
    2.5 s phases, about 12 minutes; --quick: 2 repeats of 1 s). JSON: per kind and interval,
    slowdown_pct (median, spread, mean, ci95), slowdown_mean_pct, slowdown_ci95_pct, cpu_lost_pct
    (how much longer the guest's QEMU threads waited for a CPU, from schedstat), aim_cpu_pct and
    meets_goal (null when the interval spans the goal); noise_pct, the off phases' own variation,
    is the baseline. Goal: under 1% at 1 s and 5% at 0.1 s for every kind.
    """
    _run("overhead", quick, as_json, plot)


@app.command("response")
def response(
    quick: bool = _QUICK,
    as_json: bool = _JSON,
    plot: Path | None = typer.Option(None, "--plot", help="Also draw each VM's response-time breakdown into this PNG."),
    repeats: int = typer.Option(
        1, "--repeats", min=1, help="Run each end-to-end case this many times, each in a fresh lab (1-2 min each)."
    ),
) -> None:
    """Time the response: UNTRUSTED to the first migration command, and tamper to every VM moved.

    The RC-TCB's reaction in process over 100 trials (goal p99 under 20 ms); then, in a lab of
    four hosts, 1, 2, 4 and 8 guests on the tampered host, idle and dirtying (--quick: one idle
    guest), against the same guests migrated directly on loopback in the same run (goal: SMIG's
    evacuation within 1.1x). With --repeats N each case's figures are medians over N fresh labs,
    with each repeat's under `samples`. Needs root, like `smig lab`. JSON: per run, per_vm lists
    each VM's phases (detect, judge, then its order's states) in ms after the tamper, as --plot
    draws them (from the first repeat).
    """
    _run("response", quick, as_json, plot, repeats=repeats)


@app.command("all")
def suite(
    quick: bool = _QUICK,
    write: Path | None = typer.Option(
        None, "--write", help="Replace each benchmark's section of this Markdown file (docs/BENCHMARKS.md)."
    ),
    results: Path = typer.Option(Path("bench/results"), "--results", help="Directory of the NAME.json figures."),
    plots: Path = typer.Option(Path("docs/plots"), "--plots", help="Directory of the PNG plots."),
    only: list[str] = typer.Option([], "--only", help="Run only these benchmarks (repeatable)."),
    response_repeats: int = typer.Option(
        1, "--response-repeats", min=1, help="Run each end-to-end response case this many times (1-2 min each)."
    ),
) -> None:
    """Run the suite: measure, detection, transient, placement, migration, overhead, response.

    Each writes its figures to RESULTS/NAME.json, its plot (if it draws one) to PLOTS, and its
    section of the --write file. `make bench` runs this, then the deeper scripts in bench/ (AIM
    costs, ingest), then `smig bench goals`.
    """
    from smig.bench.suite import SUITE, run_suite

    unknown = sorted(set(only) - set(SUITE))
    if unknown:
        fail(f"unknown benchmark(s) {unknown}; the suite runs {', '.join(SUITE)}")
    try:
        done = run_suite(
            [n for n in SUITE if not only or n in only],
            quick=quick,
            results=results,
            plots=plots,
            write=write,
            progress=lambda m: err.print(f"[dim]… {m}[/dim]"),
            options={"response": {"repeats": response_repeats}},
        )
    except SmigError as e:
        fail(e.message)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    out.print(f"ran {', '.join(done)}; figures in {results}" + (f", sections in {write}" if write else ""))


@app.command("goals")
def goals_command(
    results: Path = typer.Option(Path("bench/results"), "--results", help="Directory of the NAME.json figures."),
    write: Path | None = typer.Option(None, "--write", help="Replace the goals section of this Markdown file."),
    as_json: bool = _JSON,
) -> None:
    """State which goals the recorded figures meet, which they miss, which their noise leaves
    unresolved (the 95% interval spans the goal), and which have no figures yet."""
    from smig.bench.docs import write_section
    from smig.bench.suite import goals, goals_markdown

    rows = goals(results)
    if as_json:
        emit_json([{"goal": g, "figure": f, "met": m} for g, f, m in rows])
    else:
        out.print(Markdown(goals_markdown(rows)))
    if write is not None:
        write_section(write, "goals", goals_markdown(rows))


@app.command("placement")
def placement(quick: bool = _QUICK, as_json: bool = _JSON) -> None:
    """Time the planning of an evacuation of 1,000 VMs over a 1,000-host IVT.

    The pure placement function the RC-TCB runs (spreading, anti-affinity, capacity, limits),
    against a first-fit placement of the same VMs in the same run. JSON: p50_ms, p99_ms,
    baseline_ms, ratio_vs_baseline, and what was placed.
    """
    _run("placement", quick, as_json)


_REFUSED_EXIT = 3  # the run finished, but reports were refused: its figures do not count


@app.command("ingest")
def ingest(
    quick: bool = typer.Option(False, "--quick", help="500 hosts and an 8 s timed phase: under a minute in all."),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: verdicts_per_s, p99_ms, baseline_per_s, ratio, rejected, ..."
    ),
    hosts: int | None = typer.Option(
        None, "--hosts", min=3, help="Hosts in the region (default 5000; 500 with --quick)."
    ),
    clients: int = typer.Option(
        LoadConfig.clients, "--clients", min=1, help="Concurrent clients sending batches (requests in flight)."
    ),
    rounds_per_batch: int = typer.Option(
        10, "--rounds-per-batch", min=1, help="Rounds of one agent's reports per request (x its 2 subjects)."
    ),
    duration: float | None = typer.Option(
        None, "--duration", min=1.0, help="Seconds the timed phase should last (default 30; 8 with --quick)."
    ),
    connections: Connections = typer.Option(
        Connections.PERSISTENT,
        "--connections",
        help="persistent: one keep-alive TLS connection per agent, opened before timing; "
        "per-request: a full TLS handshake for every request.",
    ),
    targets: int = typer.Option(0, "--targets", min=0, help="Target digests in each report (a real one has dozens)."),
    signing: str = typer.Option(
        "batch",
        "--signing",
        help="batch: each request is one agent's reports under one signature (smig.aim.report_batch); "
        "report: a signature per report.",
    ),
) -> None:
    """Measure how many signed reports the RC-TCB ingests per second over
    HTTPS with mutual TLS, against a no-op endpoint on the same server.

    A temporary region (its CA; 5,000 hosts, each with its own Ed25519 key and
    agent certificate) is enrolled through the API of a real `smig rctcb
    serve`, started as a separate process. Every host has two monitors; their
    MATCH reports are signed before timing, then sent by concurrent clients,
    one agent's reports over several rounds per request, each request over
    that agent's own certificate.

    Measured: subject verdicts accepted per second (accepted reports / wall
    time), and the p50 and p99 latency of a request (send to full response).
    Then the same requests to /v1/noop (same TLS, same JSON parsing, nothing
    verified) as the baseline, and the ratio of the two. Every report must be
    accepted: a run with refused reports prints its figures and exits 3.

    Goal: at least 10,000 subject verdicts per second on a 2-core machine (a
    region of 5,000 hosts, each measured by two monitors every second).
    """
    base = QUICK if quick else LoadConfig()
    if signing not in ("batch", "report"):
        fail(f"--signing is 'batch' or 'report', not {signing!r}")
    try:
        config = replace(
            base,
            hosts=hosts or base.hosts,
            clients=clients,
            rounds_per_batch=rounds_per_batch,
            duration_s=duration or base.duration_s,
            connections=connections,
            targets=targets,
            one_signature=_one_signature(signing),
        )
        result = asyncio.run(run_ingest(config, progress=lambda m: err.print(f"[dim]… {m}[/dim]")))
    except SmigError as e:
        fail(e.message)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    if as_json:
        emit_json(result.to_json())
    else:
        out.print(_table(result))
    if result.ingest.rejected:
        fail(f"{result.ingest.rejected} of {result.ingest.reports} reports were refused: {result.ingest.reasons}", 3)


def _table(r: IngestResult) -> Table:
    c, figures = r.config, r.to_json()
    table = Table(box=box.SIMPLE_HEAD, title="RC-TCB ingest over HTTPS (mutual TLS)", title_justify="left")
    for name in ("endpoint", "requests", "reports", "seconds", "reports/s", "p50 ms", "p99 ms", "server CPU s"):
        table.add_column(name, justify="left" if name == "endpoint" else "right")
    for p in (r.ingest, r.baseline):
        table.add_row(
            p.endpoint,
            str(p.requests),
            str(p.reports),
            f"{p.wall_s:.2f}",
            f"{p.per_s:,.0f}",
            f"{p.p50_ms:.1f}",
            f"{p.p99_ms:.1f}",
            f"{p.server_cpu_s:.1f}",
        )
    met = "[green]met[/green]" if figures["meets_goal"] else "[red]not met[/red]"
    refused = f"[red]{r.ingest.rejected} refused: {r.ingest.reasons}[/red]" if r.ingest.rejected else "none refused"
    table.caption = (
        f"{c.hosts} hosts, {c.clients} clients, {r.batch_size} reports a request ({c.rounds_per_batch} rounds), "
        f"connections {c.connections.value} ({r.ingest.tls_handshakes} handshakes timed); {refused}; "
        f"ratio {figures['ratio']}; goal {GOAL_PER_S:,.0f}/s {met}"
    )
    return table


def _one_signature(signing: str) -> bool:
    return signing == "batch"
