"""Choosing between KVM and TCG.

``/dev/kvm`` opening is not proof that KVM can run a Linux guest: the ``kvm_pvm`` module opens
fine and runs firmware, yet a stock Debian kernel never finishes booting under it. So the
choice is made from facts about the host plus, where the facts cannot tell, a boot probe (a real
guest must reach its first heartbeat under KVM). The verdict is cached per host kernel, QEMU
build and guest image, and ``--accel`` always overrides it.

:func:`decide` is pure; :func:`gather_facts` and the cache are the I/O around it.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from smig.errors import ConfigError
from smig.model import Accel

#: Modules that provide KVM which boots ordinary Linux guests.
HARDWARE_KVM_MODULES = frozenset({"kvm_intel", "kvm_amd"})
#: Modules known to open /dev/kvm without booting a stock Linux kernel.
BROKEN_KVM_MODULES = frozenset({"kvm_pvm"})


@dataclass(frozen=True)
class HostFacts:
    """What the host says about KVM, before any guest is booted."""

    kvm_device_usable: bool
    kvm_modules: frozenset[str]


@dataclass(frozen=True)
class Decision:
    """An accelerator, whether a boot probe is still needed to confirm it, and why."""

    accel: Accel
    reason: str
    needs_probe: bool = False


def decide(facts: HostFacts, *, override: Accel | None = None, probe_booted: bool | None = None) -> Decision:
    """Pick the accelerator from host facts and, if one ran, the KVM boot probe's result.

    Returns a decision with ``needs_probe`` set when only a probe can tell; call again with
    ``probe_booted`` once it has run.

    Raises:
        ConfigError: KVM was asked for and /dev/kvm cannot be used.
    """
    if override is Accel.TCG:
        return Decision(Accel.TCG, "TCG requested")
    if override is Accel.KVM:
        if not facts.kvm_device_usable:
            raise ConfigError("--accel kvm asked for, but /dev/kvm is missing or cannot be opened")
        return Decision(Accel.KVM, "KVM requested")
    if not facts.kvm_device_usable:
        return Decision(Accel.TCG, "no usable /dev/kvm")
    broken = facts.kvm_modules & BROKEN_KVM_MODULES
    if broken and not facts.kvm_modules & HARDWARE_KVM_MODULES:
        return Decision(
            Accel.TCG, f"/dev/kvm is provided by {', '.join(sorted(broken))}, which cannot boot Linux guests"
        )
    if probe_booted is None:
        return Decision(Accel.KVM, "KVM present; a boot probe must confirm it", needs_probe=True)
    if probe_booted:
        return Decision(Accel.KVM, "a Linux guest booted under KVM")
    return Decision(Accel.TCG, "a Linux guest did not boot under KVM within the probe's time")


def gather_facts(dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")) -> HostFacts:
    """Read the host's KVM facts: can /dev/kvm be opened, which kvm modules are loaded."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        usable = False
    else:
        os.close(fd)
        usable = True
    modules = frozenset(p.name for p in sys_module.glob("kvm*") if p.name in HARDWARE_KVM_MODULES | BROKEN_KVM_MODULES)
    return HostFacts(kvm_device_usable=usable, kvm_modules=modules)


def parse_override(value: str | None) -> Accel | None:
    """``auto``/None → no override; otherwise ``kvm`` or ``tcg``.

    Raises:
        ConfigError: any other word.
    """
    if value is None or value == "auto":
        return None
    if value not in (Accel.KVM, Accel.TCG):
        raise ConfigError(f"unknown accelerator {value!r}: use kvm, tcg or auto")
    return Accel(value)


class ProbeCache:
    """Remembers probe verdicts, keyed by host kernel, QEMU binary and guest image."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def key(qemu_binary: Path, image_digest: str) -> str:
        st = qemu_binary.stat()
        return f"{platform.release()}|{qemu_binary}|{st.st_size}|{int(st.st_mtime)}|{image_digest}"

    def _load(self) -> Mapping[str, bool]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): bool(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, key: str) -> bool | None:
        return self._load().get(key)

    def put(self, key: str, booted: bool) -> None:
        data = dict(self._load())
        data[key] = booted
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.path)
