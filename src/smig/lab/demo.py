"""The region demo: tamper with one host of a lab and follow its VMs to trusted hosts.

:func:`run_demo` brings a lab up (every host TRUSTED, every guest in the IVT), tampers with one
host's hypervisor, and watches, from inside the lab's network: the RC-TCB's event stream (monitor
verdicts, trust changes, every migration step and its progress) and every guest's heartbeat, read
from its serial-port log wherever it runs. Once every VM of the tampered host has landed (or
failed) it builds each VM's timeline from the RC-TCB's audit log — the record, not this
program's impression — and the heartbeats.

Guest-visible downtime is the longest pause between two heartbeat lines during the migration,
less one heartbeat period: what the guest itself could have noticed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smig.agent.rctcb_client import read_events
from smig.hypervisor import heartbeat
from smig.lab import region, xen_region
from smig.lab.host_attacks import attack_host
from smig.lab.region import LabState
from smig.lab.xen_host import Dom0Channel

HEARTBEAT_PERIOD_MS = 100


@dataclass
class Beat:
    at: float
    counter: int
    boot_id: str
    host: str


@dataclass
class Watch:
    """What the demo saw while it ran; ``on_change`` is called after each change (for the screen)."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)  # vm → last migration event
    beats: dict[str, list[Beat]] = field(default_factory=dict)
    on_change: Callable[[Watch], None] = lambda _: None


def current_beat(state: LabState, vm: str, instances: _Instances | None = None) -> Beat | None:
    """The VM's last heartbeat, from the host whose record names its running instance.
    ``instances``: a cache of the records, kept across calls by a caller that samples often."""
    best: Beat | None = None
    records = instances if instances is not None else _Instances()
    for host in state.hosts:
        record = state.host_home(host) / "vms" / vm / "vm.json"
        instance = records.of(record)
        if instance is None:
            continue
        hb = heartbeat.read_last(record.parent / instance / "heartbeat.log")
        if hb is not None and (best is None or hb.counter > best.counter):
            best = Beat(time.time(), hb.counter, hb.boot_id, host)
    return best


class _Instances:
    """The instance each VM record names, read again only when the record changes: the demo
    samples every VM's heartbeat fifty times a second, and must not take the CPU it measures."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple[int, int, int], str | None]] = {}

    def of(self, record: Path) -> str | None:
        try:
            st = record.stat()
        except OSError:
            return None
        # The inode too: a record replaced within the clock's tick keeps its mtime, not its inode.
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._seen.get(record)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            instance = str(json.loads(record.read_text())["instance"])
        except (OSError, ValueError, KeyError):
            instance = None
        self._seen[record] = (stamp, instance)
        return instance


def _beats(state: LabState, vms: list[str], instances: _Instances) -> list[tuple[str, Beat | None]]:
    return [(vm, current_beat(state, vm, instances)) for vm in vms]


async def _xen_beats(vms: list[str], channels: dict[str, Dom0Channel]) -> list[tuple[str, Beat | None]]:
    """Each VM's last heartbeat as the dom0s' console logs hold it, from the host that has the
    highest counter (a source's log stops where the target's goes on)."""
    found = await asyncio.gather(*(xen_region.heartbeats(ch) for ch in channels.values()), return_exceptions=True)
    best: dict[str, Beat] = {}
    now = time.time()
    for host, beats in zip(channels, found, strict=True):
        if isinstance(beats, BaseException):
            continue
        for vm, hb in beats.items():
            if vm in vms and (vm not in best or hb.counter > best[vm].counter):
                best[vm] = Beat(now, hb.counter, hb.boot_id, host)
    return [(vm, best.get(vm)) for vm in vms]


async def _sample(state: LabState, vms: list[str], watch: Watch, stop: asyncio.Event) -> None:
    instances = _Instances()
    channels = {h: xen_region.channel(state, h) for h in state.hosts} if state.hypervisor == "xen" else {}
    try:
        while not stop.is_set():
            if channels:
                # Through each dom0's exec channel: coarser than the files QEMU guests leave here.
                sampled = await _xen_beats(vms, channels)
            else:
                sampled = await asyncio.to_thread(_beats, state, vms, instances)
            for vm, beat in sampled:
                seen = watch.beats.setdefault(vm, [])
                if beat is not None and (not seen or beat.counter != seen[-1].counter):
                    seen.append(beat)
            await asyncio.sleep(0.25 if channels else 0.02)
    finally:
        for ch in channels.values():
            await ch.close()


async def _follow(state: LabState, watch: Watch, stop: asyncio.Event) -> None:
    async with region.operator_client(state, timeout_s=30) as op:
        while not stop.is_set():
            try:
                async with op.stream("GET", "/v1/events", timeout=None) as r:
                    async for kind, data in read_events(r.aiter_lines()):
                        watch.events.append((time.time(), kind, data))
                        if kind.startswith("migration."):
                            watch.progress[data["vm"]] = {"kind": kind, **data}
                        watch.on_change(watch)
            except Exception:  # the stream broke: reconnect while the demo runs
                await asyncio.sleep(0.5)


async def _poll_rows(state: LabState, watch: Watch, stop: asyncio.Event) -> None:
    async with region.operator_client(state) as op:
        while not stop.is_set():
            try:
                watch.rows = {h["host"]: h for h in (await op.get("/v1/hosts")).json()["hosts"]}
                watch.on_change(watch)
            except Exception:
                pass
            await asyncio.sleep(0.5)


async def _audit(state: LabState) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    async with region.operator_client(state) as op:
        since = 0
        while True:
            batch = (await op.get("/v1/audit", params={"since": since, "limit": 10000})).json()["entries"]
            entries += batch
            if len(batch) < 10000:
                return entries
            since = batch[-1]["seq"]


def _first(entries: list[dict[str, Any]], test: Callable[[dict[str, Any]], bool]) -> float | None:
    return next((e["at"] for e in entries if test(e)), None)


def timeline(
    attacked: str, vms: list[str], tamper_at: float, entries: list[dict[str, Any]], beats: dict[str, list[Beat]]
) -> list[dict[str, Any]]:
    """Each VM's timeline from the audit log and the heartbeats it kept (pure, for the tests too)."""
    after = [e for e in entries if e["at"] >= tamper_at - 1.0]
    detected = _first(
        after,
        lambda e: (
            e["kind"] == "report.accepted" and e["subject"] == attacked and e["body"].get("verdict") == "mismatch"
        ),
    )
    untrusted = _first(
        after,
        lambda e: e["kind"] == "trust.changed" and e["subject"] == attacked and e["body"].get("new") == "untrusted",
    )
    decided = _first(after, lambda e: e["kind"] == "evacuation.planned" and e["subject"] == attacked)
    out = []
    for vm in vms:
        mine = [e for e in after if e["subject"] == vm and e["kind"].startswith("migration.")]
        started = _first(mine, lambda e: e["kind"] == "migration.migrating")
        done = next((e for e in mine if e["kind"] == "migration.done"), None)
        restarted = any(e["kind"] == "migration.restarting" for e in mine)
        seen = beats.get(vm, [])
        before = [b for b in seen if b.at <= tamper_at]
        landed = [b for b in seen if done is not None and b.at >= done["at"]]
        out.append(
            {
                "name": vm,
                "source": attacked,
                "target": done["body"]["target"] if done else None,
                "mode": "restart" if restarted else "live",
                "state": "done" if done else (mine[-1]["kind"].split(".", 1)[1] if mine else "not moved"),
                "tamper_at": tamper_at,
                "detected_at": detected,
                "untrusted_at": untrusted,
                "decided_at": decided,
                "migration_started_at": started,
                "migration_completed_at": done["at"] if done else None,
                "downtime_ms": _downtime_ms(seen, started, done["at"] if done else None),
                "heartbeat_before": before[-1].counter if before else None,
                "heartbeat_after": landed[-1].counter if landed else None,
                "boot_id_before": before[-1].boot_id if before else None,
                "boot_id_after": landed[-1].boot_id if landed else None,
                "running_on": seen[-1].host if seen else None,
                # Every step of its order, as the audit log has it: why a move ended as it did.
                "steps": [
                    {
                        "kind": e["kind"],
                        "at": e["at"],
                        "target": e["body"].get("target"),
                        "reason": e["body"].get("reason"),
                    }
                    for e in mine
                ],
            }
        )
    return out


def _downtime_ms(beats: list[Beat], start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    window = [b for b in beats if start - 1.0 <= b.at <= end + 5.0]
    gaps = [(b.at - a.at) * 1000 for a, b in itertools.pairwise(window)]
    return round(max(0.0, max(gaps) - HEARTBEAT_PERIOD_MS), 1) if gaps else None


@dataclass
class DemoResult:
    attacked_host: str
    attack: str
    policy: str
    hosts: list[dict[str, str]]
    vms: list[dict[str, Any]]
    response_time_ms: float | None
    lab_up_s: float
    events: int
    placement_before: dict[str, str] = field(default_factory=dict)  # VM → host
    placement_after: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "placement_before": self.placement_before,
            "placement_after": self.placement_after,
            "attacked_host": self.attacked_host,
            "attack": self.attack,
            "policy": self.policy,
            "hosts": self.hosts,
            "vms": self.vms,
            "response_time_ms": self.response_time_ms,
            "lab_up_s": self.lab_up_s,
            "events": self.events,
        }


async def _evacuation(
    state: LabState, attacked: str, attack: str, watch: Watch, timeout_s: float, settle_s: float
) -> tuple[float, list[dict[str, Any]]]:
    vms = sorted(state.vms)
    moving = sorted(vm for vm, host in state.vms.items() if host == attacked)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(_sample(state, vms, watch, stop)),
        asyncio.create_task(_follow(state, watch, stop)),
        asyncio.create_task(_poll_rows(state, watch, stop)),
    ]
    try:
        await asyncio.sleep(settle_s)  # heartbeats before the tamper
        # Every guest seen beating first (a Xen lab's first samples come through slow dom0s).
        for _ in range(480):  # 120 s at most
            if all(watch.beats.get(vm) for vm in vms):
                break
            await asyncio.sleep(0.25)
        record = await asyncio.to_thread(attack_host, state, attacked, attack)
        # The moment the bytes changed, as the attack recorded it: what the attacker spent before
        # (loading a reference to aim with, seconds for a dom0 kernel) is not SMIG's response time.
        tamper_at = record.applied_at
        state.attacks.append({**record.to_json(), "host": attacked})
        state.save()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ends = {vm: watch.progress.get(vm, {}).get("kind") for vm in moving}
            if all(kind in ("migration.done", "migration.failed") for kind in ends.values()):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # heartbeats after the landing
        ended = time.time()
        for _ in range(240):  # and one sampled after it, at most 60 s on (a Xen lab samples slowly)
            if all(watch.beats.get(vm) and watch.beats[vm][-1].at > ended for vm in moving):
                break
            await asyncio.sleep(0.25)
        entries = await _audit(state)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return tamper_at, timeline(attacked, moving, tamper_at, entries, watch.beats)


def run_demo(
    *,
    name: str,
    hosts: int,
    vms_per_host: int,
    attack: str,
    policy: str,
    memory_mib: int,
    dirty_mbps: int,
    interval_s: float,
    timeout_s: float,
    keep: bool,
    progress: Callable[[str], None],
    watch: Watch,
    network: str = "auto",
    only_attacked_runs_vms: bool = False,
    hypervisor: str = "qemu",
) -> DemoResult:
    """Bring the lab up, tamper with its first host, follow the evacuation; take the lab down
    again unless ``keep``. With ``only_attacked_runs_vms`` the guests all boot on the host that
    is then tampered with (the others are the targets). Raises what :func:`smig.lab.region.up` raises."""
    started = time.monotonic()
    state = region.up(
        name,
        hosts,
        vms_per_host,
        memory_mib=memory_mib,
        dirty_mbps=dirty_mbps,
        policy=policy,
        interval_s=interval_s,
        vm_hosts=["h1"] if only_attacked_runs_vms else None,
        network=network,
        hypervisor=hypervisor,
        progress=progress,
    )
    up_s = time.monotonic() - started
    attacked = state.hosts[0]
    try:
        progress(f"region ready in {up_s:.0f} s; tampering with {attacked} ({attack})")
        tamper_at, vms = region.inside(state, lambda: _evacuation(state, attacked, attack, watch, timeout_s, 1.0))
        final = {h: r.get("state", "unknown") for h, r in watch.rows.items()}
        completed = [v["migration_completed_at"] for v in vms]
        response = (
            round((max(completed) - tamper_at) * 1000, 1)
            if completed and all(c is not None for c in completed)
            else None
        )
        after = {vm: beat.host for vm, beat in _last_beats(state) if beat is not None}
        return DemoResult(
            placement_before=dict(state.vms),
            placement_after=after,
            attacked_host=attacked,
            attack=attack,
            policy=policy,
            hosts=[{"id": h, "state": final.get(h, "unknown")} for h in state.hosts],
            vms=vms,
            response_time_ms=response,
            lab_up_s=round(up_s, 1),
            events=len(watch.events),
        )
    finally:
        if not keep:
            region.down(name)


def _last_beats(state: LabState) -> list[tuple[str, Beat | None]]:
    vms = sorted(state.vms)
    if state.hypervisor != "xen":
        return [(vm, current_beat(state, vm)) for vm in vms]

    async def sample() -> list[tuple[str, Beat | None]]:
        channels = {h: xen_region.channel(state, h) for h in state.hosts}
        try:
            return await _xen_beats(vms, channels)
        finally:
            for ch in channels.values():
                await ch.close()

    return asyncio.run(sample())


def write_json(result: DemoResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n")
