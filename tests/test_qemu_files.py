"""The QEMU driver's files: the logs of a QEMU that exited on its own outlive its directory."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.hypervisor.qemu_files import KEEP_EXITED, VMFiles
from smig.model import Accel, IncomingVM, VMSpec
from smig.paths import smig_cache


def _instance(files: VMFiles, name: str, console: str) -> str:
    paths = files.new_instance(name)
    paths.console.write_text(console)
    paths.log.write_text("qemu-system-x86_64: terminating on signal 15\n")
    return paths.directory.name


def test_a_dead_incoming_slot_leaves_its_logs_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    driver = QemuDriver(QemuConfig(home=tmp_path, cache=smig_cache()))
    files = VMFiles(tmp_path)
    spec = VMSpec(name="web", memory_mib=256)
    instance = _instance(files, "web", "Kernel panic - not syncing: Attempted to kill init!\n")
    # A slot whose QEMU is gone (its pid names no process of this instance) is dropped...
    dead = IncomingVM(spec=spec, uri="tcp:127.0.0.1:1", pid=2**22 + 1, instance=instance, accel=Accel.TCG)
    asyncio.run(driver.abort_incoming(dead))
    assert not files.paths("web", instance).directory.exists()
    # ...and what its guest and QEMU last said is still there for the operator.
    kept = tmp_path / "exited" / f"web-{instance}"
    assert (kept / "console.log").read_text().startswith("Kernel panic")
    assert (kept / "qemu.log").exists()
    # Only the newest KEEP_EXITED are kept (each dated a second after the one before).
    os.utime(kept, (1e9, 1e9))
    for i in range(KEEP_EXITED + 3):
        other = _instance(files, "web", f"boot {i}\n")
        assert files.keep_logs("web", other) is not None
        os.utime(tmp_path / "exited" / f"web-{other}", (1e9 + 1 + i, 1e9 + 1 + i))
    left = sorted((tmp_path / "exited").iterdir(), key=lambda d: d.stat().st_mtime)
    assert len(left) == KEEP_EXITED
    assert (left[-1] / "console.log").read_text() == f"boot {KEEP_EXITED + 2}\n"
    assert not kept.exists(), "the oldest went first"
