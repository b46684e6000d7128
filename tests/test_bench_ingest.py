"""The ingest benchmark as `smig bench ingest` runs it: a small region loaded over real HTTPS, every
report counted, both endpoints timed, and nothing left behind."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from smig.rctcb.loadgen import LoadConfig, run_ingest

SMIG = str(Path(sys.executable).parent / "smig")


def test_a_small_region_is_ingested_whole_and_leaves_nothing_behind(tmp_path: Path) -> None:
    config = LoadConfig(hosts=40, clients=2, rounds=2, rounds_per_batch=2, root=tmp_path)

    result = asyncio.run(run_ingest(config))

    figures = result.to_json()
    assert figures["rejected"] == 0 and figures["accepted"] == figures["reports"] == 40 * 2 * 2
    assert figures["batches"] == 40 and figures["batch_size"] == 4
    assert figures["verdicts_per_s"] > 0 and figures["baseline_per_s"] > 0
    assert figures["p99_ms"] >= figures["p50_ms"] > 0
    assert figures["baseline_p99_ms"] >= figures["baseline_p50_ms"] > 0
    assert result.baseline.accepted == result.baseline.reports == 160, "the no-op parsed every batch"
    assert not Path(f"/proc/{result.server_pid}").exists(), "the service was stopped"
    assert not Path(result.home).exists() and list(tmp_path.iterdir()) == [], "the temporary home was removed"


def test_the_command_explains_itself() -> None:
    done = subprocess.run([SMIG, "bench", "ingest", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for words in ("--quick", "--json", "/v1/noop", "10,000"):
        assert words in done.stdout
