"""The `smig` command as scripts and people use it: the contract's commands and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import qemu_pids

SMIG = str(Path(sys.executable).parent / "smig")


def smig(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([SMIG, *args], env=env, capture_output=True, text=True, timeout=240, check=False)
    if ok:
        assert done.returncode == 0, f"smig {' '.join(args)} failed: {done.stderr}"
    return done


def smig_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(smig(env, *args, "--json").stdout)


def _status_with_heartbeat(env: dict[str, str], name: str) -> Any:
    """`vm status` until it reports the guest's boot id: a TCG guest's first heartbeat after a
    migration has been seen to take longer than status waits when the machine is busy."""
    for _ in range(3):
        status = smig_json(env, "vm", "status", name)
        if status["boot_id"] is not None:
            break
    return status


def _panicked(home: Path, name: str) -> bool:
    return any("Kernel panic" in log.read_text(errors="replace") for log in (home / "vms" / name).glob("*/console.log"))


@pytest.mark.qemu
def test_launch_status_migrate_stop_contract(cli_env: dict[str, str], home: Path) -> None:
    try:
        _contract(cli_env, home)
    except AssertionError:
        # QEMU 7.2's TCG corruption of a writing guest (README, "Known limits") kills it now and
        # then after a migration: retry once with a fresh guest, and only for that.
        if not _panicked(home, "web"):
            raise
        smig(cli_env, "vm", "stop", "web", ok=False)
        _contract(cli_env, home)


def _contract(cli_env: dict[str, str], home: Path) -> None:
    launched = smig_json(cli_env, "vm", "launch", "web", "--memory", "256", "--dirty-mbps", "10")
    assert launched["name"] == "web" and launched["accel"] in ("kvm", "tcg") and launched["pid"] > 0

    st1 = smig_json(cli_env, "vm", "status", "web")
    assert {"name", "pid", "state", "heartbeat", "boot_id"} <= st1.keys()
    assert st1["pid"] == launched["pid"] and st1["state"] == "running" and isinstance(st1["heartbeat"], int)

    moved = smig_json(cli_env, "vm", "migrate", "web")
    assert {"total_ms", "downtime_ms", "transferred_bytes", "source_pid", "target_pid"} <= moved.keys()
    assert moved["source_pid"] == launched["pid"] and moved["target_pid"] != launched["pid"]

    st2 = _status_with_heartbeat(cli_env, "web")
    assert st2["pid"] == moved["target_pid"] and st2["boot_id"] == st1["boot_id"]
    assert st2["heartbeat"] > st1["heartbeat"]

    secure = smig_json(cli_env, "vm", "migrate", "web", "--tls")
    assert secure["tls"] is True and secure["source_pid"] == moved["target_pid"]
    st3 = _status_with_heartbeat(cli_env, "web")
    assert st3["pid"] == secure["target_pid"] and st3["boot_id"] == st1["boot_id"]
    assert [v["name"] for v in smig_json(cli_env, "vm", "list")] == ["web"]

    human = smig(cli_env, "vm", "migrate", "web", "--transport", "unix")
    assert "web migrated (unix)" in human.stdout and "downtime" in human.stdout

    smig(cli_env, "vm", "stop", "web")
    assert qemu_pids(str(home)) == []
    assert smig_json(cli_env, "vm", "list") == []


@pytest.mark.parametrize(
    "args, message",
    [
        (("vm", "status", "nope"), "no VM named 'nope'"),
        (("vm", "stop", "nope"), "no VM named 'nope'"),
        (("vm", "migrate", "nope", "--json"), "no VM named 'nope'"),
        (("vm", "launch", "Bad/Name"), "bad VM name"),
        (("vm", "launch", "x", "--accel", "hvf"), "unknown accelerator"),
        (("vm", "migrate", "x", "--tls-dir", "/nonexistent"), "--tls-dir needs --tls"),
    ],
)
def test_failures_exit_non_zero_with_one_line(cli_env: dict[str, str], args: tuple[str, ...], message: str) -> None:
    done = smig(cli_env, *args, ok=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smig: error:") and message in lines[0], done.stderr
    assert done.stdout == ""


def test_help_teaches(cli_env: dict[str, str]) -> None:
    text = smig(cli_env, "vm", "migrate", "--help").stdout
    for flag in ("--tls", "--transport", "--bandwidth", "--downtime-ms", "--timeout", "--json"):
        assert flag in text


@pytest.mark.qemu
def test_demo_moves_a_busy_guest_twice_without_a_reboot(cli_env: dict[str, str], home: Path) -> None:
    report = json.loads(smig(cli_env, "vm", "demo", "--dirty-mbps", "10", "--json").stdout)
    moves = report["migrations"]
    assert [m["migration"] for m in moves] == ["plain", "TLS"]
    for m in moves:
        assert m["boot_id_unchanged"] and m["source_gone"]
        assert m["heartbeat_after"] > m["heartbeat_before"]
    assert qemu_pids(str(home)) == []
