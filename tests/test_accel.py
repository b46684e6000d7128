"""Choosing KVM or TCG: the pure decision, and the real probe on this machine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from smig.errors import ConfigError
from smig.hypervisor.accel import HostFacts, ProbeCache, decide, gather_facts, parse_override
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.model import Accel
from smig.paths import smig_cache

PVM = HostFacts(kvm_device_usable=True, kvm_modules=frozenset({"kvm_pvm"}))
INTEL = HostFacts(kvm_device_usable=True, kvm_modules=frozenset({"kvm_intel"}))
NO_DEV = HostFacts(kvm_device_usable=False, kvm_modules=frozenset())


def test_kvm_pvm_host_runs_guests_under_tcg_without_probing() -> None:
    d = decide(PVM)
    assert d.accel is Accel.TCG and not d.needs_probe
    assert "kvm_pvm" in d.reason


def test_hardware_kvm_needs_a_boot_probe_then_follows_it() -> None:
    assert decide(INTEL).needs_probe
    assert decide(INTEL, probe_booted=True).accel is Accel.KVM
    failed = decide(INTEL, probe_booted=False)
    assert failed.accel is Accel.TCG and "did not boot" in failed.reason


def test_no_kvm_device_means_tcg_and_forcing_kvm_is_an_error() -> None:
    assert decide(NO_DEV).accel is Accel.TCG
    with pytest.raises(ConfigError, match="/dev/kvm"):
        decide(NO_DEV, override=Accel.KVM)


def test_override_wins() -> None:
    assert decide(PVM, override=Accel.KVM).accel is Accel.KVM
    assert decide(INTEL, override=Accel.TCG, probe_booted=True).accel is Accel.TCG
    assert parse_override("auto") is None
    with pytest.raises(ConfigError, match="unknown accelerator"):
        parse_override("hvf")


def test_probe_cache_remembers_verdicts(tmp_path: Path) -> None:
    cache = ProbeCache(tmp_path / "accel.json")
    assert cache.get("k") is None
    cache.put("k", False)
    cache.put("j", True)
    assert ProbeCache(tmp_path / "accel.json").get("k") is False
    assert ProbeCache(tmp_path / "accel.json").get("j") is True


def test_this_machine_decides_by_its_facts(home: Path, guest_image: object) -> None:
    """Here /dev/kvm is kvm_pvm: the choice must be TCG, made without a probe."""
    facts = gather_facts()
    accel, reason = asyncio.run(QemuDriver(QemuConfig(home=home, cache=smig_cache())).accelerator())
    if "kvm_pvm" in facts.kvm_modules and not facts.kvm_modules & {"kvm_intel", "kvm_amd"}:
        assert accel is Accel.TCG and "kvm_pvm" in reason
    elif not facts.kvm_device_usable:
        assert accel is Accel.TCG
    else:  # a host with real KVM: the probe decided, and its verdict is cached
        assert ProbeCache(smig_cache() / "accel.json")._load()


class _ProbingDriver(QemuDriver):
    """A driver on a host that claims hardware KVM, with the probe's answer fixed."""

    def __init__(self, config: QemuConfig, booted: bool) -> None:
        super().__init__(config)
        self.booted = booted
        self.probes = 0

    async def probe_boot(self, accel: Accel, timeout_s: float) -> bool:
        self.probes += 1
        return self.booted


@pytest.mark.parametrize("booted, expected", [(True, Accel.KVM), (False, Accel.TCG)])
def test_driver_probes_once_and_caches(
    home: Path, guest_image: object, monkeypatch: pytest.MonkeyPatch, booted: bool, expected: Accel
) -> None:
    monkeypatch.setattr("smig.hypervisor.qemu.accel_mod.gather_facts", lambda: INTEL)
    cache_dir = home / "cache"
    (cache_dir / "images").mkdir(parents=True)
    (cache_dir / "images" / "current").symlink_to(smig_cache() / "images" / "current")
    config = QemuConfig(home=home, cache=cache_dir)
    first = _ProbingDriver(config, booted)
    assert asyncio.run(first.accelerator())[0] is expected
    second = _ProbingDriver(config, not booted)  # a new process: must trust the cached verdict
    assert asyncio.run(second.accelerator())[0] is expected
    assert (first.probes, second.probes) == (1, 0)


@pytest.mark.qemu
def test_real_probe_tells_a_booting_accelerator_from_a_stuck_one(home: Path, guest_image: object) -> None:
    d = QemuDriver(QemuConfig(home=home, cache=smig_cache()))
    assert asyncio.run(d.probe_boot(Accel.TCG, 60.0)) is True
    facts = gather_facts()
    if "kvm_pvm" in facts.kvm_modules and not facts.kvm_modules & {"kvm_intel", "kvm_amd"}:
        # kvm_pvm opens /dev/kvm but a stock kernel never gets to user space under it.
        assert asyncio.run(d.probe_boot(Accel.KVM, 12.0)) is False
    assert not any((home / "vms").iterdir()) if (home / "vms").exists() else True
