"""The overhead benchmark's arithmetic and the workload guests it builds, without booting one."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smig.bench import overhead, workload
from smig.bench.stats import judge, mean_ci95
from smig.bench.workload import Sample, Serial, score, slowdown_pct
from smig.hypervisor.qemu_argv import InstancePaths
from smig.model import Accel


def test_throughput_is_units_per_guest_second_and_idle_is_lateness_per_tick() -> None:
    a, b = Sample(units=100, guest_ms=1_000, late_us=500), Sample(units=600, guest_ms=3_000, late_us=2_500)
    assert score("compute", a, b) == 250.0
    assert score("idle", a, b) == 4.0  # 2,000 us over 500 ticks


def test_slowdown_is_lost_throughput_or_lateness_as_a_share_of_the_tick() -> None:
    assert slowdown_pct("disk", 95.0, 100.0) == pytest.approx(5.0)
    assert slowdown_pct("net", 110.0, 100.0) == pytest.approx(-10.0)
    assert slowdown_pct("idle", 150.0, 50.0) == pytest.approx(1.0)  # 100 us more of a 10 ms tick
    assert math.isnan(slowdown_pct("compute", 1.0, 0.0))


def test_the_interval_is_students_and_the_goal_is_judged_by_its_ends() -> None:
    assert mean_ci95([1.0]) is None
    ci = mean_ci95([1.0, 3.0])  # stdev sqrt(2), n = 2: the half-width is t(1 dof) itself
    assert ci is not None and ci[0] == 2.0 and ci[2] - ci[0] == pytest.approx(12.71) == ci[0] - ci[1]
    assert mean_ci95([0.5] * 40) == (0.5, 0.5, 0.5)
    assert judge((0.2, -0.3, 0.7), 1.0) is True
    assert judge((2.0, 1.5, 2.5), 1.0) is False
    assert judge((0.8, 0.1, 1.5), 1.0) is None, "an interval that spans the goal decides nothing"
    assert judge(None, 1.0) is None


def test_off_phases_surround_every_measured_phase_and_the_order_rotates() -> None:
    order = overhead.phase_order(2)
    assert order == [None, 2.0, None, 1.0, None, 0.1, None, 1.0, None, 0.1, None, 2.0, None]


def test_the_run_queue_wait_of_a_process_grows_while_it_competes_for_a_cpu() -> None:
    # One more busy process than there are cores: each of them must wait for a CPU at times.
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range((os.cpu_count() or 1) + 1)]
    try:
        before = overhead.run_queue_wait_s(busy[0].pid)
        time.sleep(1.0)
        assert overhead.run_queue_wait_s(busy[0].pid) - before > 0.01
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert overhead.run_queue_wait_s(busy[0].pid) == 0.0, "a process that is gone waited for nothing"


def test_the_serial_reader_keeps_only_whole_lines_of_its_workload(tmp_path: Path) -> None:
    log = tmp_path / "heartbeat.log"
    log.write_bytes(b"SMIG-HB id 1 100\nSMIG-WL disk 1024 250 0\nSMIG-WL net 5 250 0\nSMIG-WL disk 20")
    serial = Serial(log, "disk")
    assert serial.mark() == 1
    with log.open("ab") as f:
        f.write(b"48 500 0\nSMIG-WL disk x 750 0\n")
    assert serial.mark() == 2 and serial.samples[-1] == Sample(2048, 500, 0)


def test_the_guest_gets_its_device_and_its_workload_on_the_kernel_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Image:
        kernel, initrd = Path("/k"), Path("/i")

    monkeypatch.setattr("smig.guest.image.ImageBuilder.load", lambda self: Image())
    paths = InstancePaths(tmp_path)
    disk = workload.guest_argv("disk", paths, Accel.TCG)
    assert "virtio-blk-pci,drive=disk0" in disk and (tmp_path / "disk.raw").stat().st_size == 64 << 20
    assert disk[disk.index("-append") + 1].endswith("smig_modules=1 smig_work=disk")
    net = workload.guest_argv("net", paths, Accel.TCG, net_port=4321)
    assert "user,id=net0" in net and "hostfwd" not in " ".join(net), "nothing listens on the host for the guest"
    assert "smig_net_port=4321" in net[net.index("-append") + 1]
    with pytest.raises(ValueError):
        workload.guest_argv("net", paths, Accel.TCG)
