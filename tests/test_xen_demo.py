"""SMIG on Xen end to end, as a user runs it: ``smig demo --hypervisor xen``.

Three nested Xen hosts on the lab's network, the agent in each dom0, each host's monitor outside
it, a guest on each. Xen's own code on the first host is flipped from outside; its neighbours'
monitors read it from the host's memory and name the function, the quorum policy turns the host
UNTRUSTED, and its guest moves live to a trusted Xen host, where it runs once, not rebooted.

The suite's one cross-host Xen migration (minutes under TCG); the driver suite's stay within a
host.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from smig.lab import net, region
from tests.test_lab_e2e import SMIG, _api, _down, _status

pytestmark = pytest.mark.qemu


@pytest.mark.timeout(2400)
def test_the_xen_demo_moves_a_tampered_xen_hosts_guest_live_to_a_trusted_xen_host(
    cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xen_image: object
) -> None:
    monkeypatch.setenv("SMIG_HOME", cli_env["SMIG_HOME"])
    lab = "e2ex"
    out = tmp_path / "demo.json"
    argv = [SMIG, "demo", "--hypervisor", "xen", "--hosts", "3", "--vms-per-host", "1", "--policy", "quorum"]
    argv += ["--json", str(out), "--name", lab, "--keep"]
    try:
        done = subprocess.run(argv, env=cli_env, capture_output=True, text=True, timeout=2100)
        assert done.returncode == 0, f"demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
        result = json.loads(out.read_text())
        # The same keys as the QEMU demo writes.
        assert set(result) >= {"attacked_host", "attack", "hosts", "vms", "response_time_ms", "placement_after"}
        attacked = result["attacked_host"]
        states = {h["id"]: h["state"] for h in result["hosts"]}
        assert result["attack"] == "xen-code" and states[attacked] == "untrusted"
        assert all(s == "trusted" for h, s in states.items() if h != attacked), states
        (vm,) = [v for v in result["vms"] if v["source"] == attacked]
        assert vm["target"] not in (None, attacked) and states[vm["target"]] == "trusted"
        assert vm["mode"] == "live" and vm["state"] == "done"
        assert vm["boot_id_before"] == vm["boot_id_after"] is not None, "the guest was rebooted, not migrated"
        assert vm["heartbeat_after"] > vm["heartbeat_before"]
        assert vm["downtime_ms"] is not None  # from heartbeats sampled through dom0: coarse
        times = [vm[k] for k in ("tamper_at", "detected_at", "untrusted_at", "decided_at")]
        times += [vm["migration_started_at"], vm["migration_completed_at"]]
        assert times == sorted(times), times
        # Exactly once: the IVT, the guests' heartbeats and the target's Xen agree.
        status = _status(cli_env, lab)
        assert status["hypervisor"] == "xen"
        assert {v["name"]: v["host"] for v in status["vms"]}[vm["name"]] == vm["target"]
        assert result["placement_after"][vm["name"]] == vm["target"]
        # The mismatch the neighbour reported names Xen's code, where the attack wrote.
        state = region.load(lab)
        entries = region.inside(state, lambda: _api(state, "GET", "/v1/audit?limit=10000"))["entries"]
        mismatches = [e for e in entries if e["kind"] == "report.accepted" and e["body"].get("verdict") == "mismatch"]
        assert mismatches and all(e["subject"] == attacked for e in mismatches)
        first = mismatches[0]["body"]["first"]
        assert first["path"] == "xen:.text" and "do_kexec_op+0x8" in first["reason"], first
        changes = [(e["subject"], e["body"]["new"]) for e in entries if e["kind"] == "trust.changed"]
        assert (attacked, "untrusted") in changes and all(h == attacked for h, _ in changes), changes
    finally:
        _down(cli_env, lab)
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(f"{net.PREFIX}{lab}-")]
