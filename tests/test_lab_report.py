"""The demo's HTML report: a page naming every VM's steps, and two real PNG plots."""

from __future__ import annotations

from pathlib import Path

from smig.lab.report import write_report

T = 1_800_000_000.0


def test_the_report_has_the_timeline_and_two_plots(tmp_path: Path) -> None:
    vm = {
        "name": "h1-vm1", "source": "h1", "target": "h2", "mode": "live", "tamper_at": T, "detected_at": T + 0.5,
        "untrusted_at": T + 0.6, "decided_at": T + 0.62, "migration_started_at": T + 1.1,
        "migration_completed_at": T + 2.9, "downtime_ms": 400.0, "heartbeat_before": 28, "heartbeat_after": 70,
        "boot_id_before": "b", "boot_id_after": "b",
    }  # fmt: skip
    result = {
        "attacked_host": "h1", "attack": "patch", "policy": "quorum", "response_time_ms": 2900.0,
        "hosts": [{"id": "h1", "state": "untrusted"}, {"id": "h2", "state": "trusted"}],
        "vms": [vm], "placement_before": {"h1-vm1": "h1"}, "placement_after": {"h1-vm1": "h2"},
    }  # fmt: skip
    page = write_report(result, tmp_path / "r")
    text = page.read_text()
    assert "h1 tampered (patch, policy quorum)" in text and "<b>2900 ms</b>" in text
    assert "<td>h1-vm1</td><td>h1</td><td>h2</td><td>live</td><td>500</td><td>600</td>" in text
    for png in ("response.png", "region.png"):
        data = (tmp_path / "r" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
