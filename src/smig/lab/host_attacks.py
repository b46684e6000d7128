"""Attacks on one lab host's hypervisor, built on :mod:`smig.lab.attacks`.

The lab's hosts share this machine's filesystem, so an attack on disk must not touch the
installed QEMU (every host would turn untrusted). The on-disk kinds therefore act on the attacked
host alone: ``swap-binary`` modifies a private copy of QEMU and starts a hypervisor process from
it inside the host; ``preload`` starts one with an injected library. The in-memory kinds patch a
running hypervisor process of the host (one of its VMs' QEMU).

======================  ==============================================================
kind                    what changes on the host
======================  ==============================================================
``patch``               one byte of the QEMU binary's code, in a running VM's process
``patch-lib``           one byte of a library's code (libglib) in that process
``anon-exec``           anonymous executable memory mapped into that process
``swap-binary``         a hypervisor process started from a modified QEMU binary
``preload``             a hypervisor process started with an injected library
``lie``                 the host's agent, restarted as a monitor that reports false
                        mismatches about every subject it measures
``ignore-orders``       the host's agent, restarted to ignore the RC-TCB's orders
``xen-code``            (Xen labs) one byte of Xen's code, written from outside
                        the nested host into its outer QEMU's memory
``xen-toolstack``       (Xen labs) one byte of dom0's xenstored's code, written the same way
======================  ==============================================================

``transient_ms`` makes ``patch``/``patch-lib`` restore themselves after that long.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from smig.aim.xen_dom0 import Dom0Reference
from smig.errors import AttackError
from smig.lab import attacks, net, xen_attacks, xen_region
from smig.lab.bare import BARE_ARGS, DEFAULT_BINARY, FIRMWARE_DIRS

if TYPE_CHECKING:
    from smig.lab.region import LabState

KINDS = ("patch", "patch-lib", "anon-exec", "swap-binary", "preload", "lie", "ignore-orders")
AGENT_KINDS = ("lie", "ignore-orders")
LIBRARY = "libglib"


def _victim(state: LabState, host: str) -> int:
    from smig.lab import region

    if host not in state.hosts:
        raise AttackError(f"no host {host!r} in lab {state.lab!r} (hosts: {', '.join(state.hosts)})")
    pids = region.hypervisor_pids(state, host)
    if not pids:
        raise AttackError(f"{host} runs no hypervisor process to patch; use swap-binary or preload, or give it a VM")
    return pids[0]


def _module_dir() -> str | None:
    """Where the installed QEMU keeps its loadable modules (the TCG accelerator is one)."""
    for candidate in [*sorted(glob.glob("/usr/lib/*/qemu")), "/usr/lib/qemu"]:
        if glob.glob(f"{candidate}/accel-*.so"):
            return candidate
    return None


def _start_hypervisor(state: LabState, host: str, binary: str, env: dict[str, str]) -> int:
    """A hypervisor process inside ``host`` (a stopped QEMU, as a VM's would be before it runs).
    Raises AttackError if it does not stay up."""
    workdir = state.host_home(host) / "attack"
    # The pidfile puts the host's directory on the command line: how the process is the host's
    # where hosts share one network namespace (the loopback lab).
    argv = [binary, *BARE_ARGS, "-pidfile", str(workdir / f"hypervisor-{time.monotonic_ns()}.pid")]
    if binary != DEFAULT_BINARY:
        # A copy looks for its firmware and its modules beside itself: point it at the installed ones.
        argv += list(FIRMWARE_DIRS)
        modules = _module_dir()
        if modules is not None:
            env = {**env, "QEMU_MODULE_DIR": modules}
    log_path = workdir / "hypervisor.log"
    netns = state.netns_of(state.network.hosts[host])
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            net.netns_argv(netns, argv) if netns else argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env={**os.environ, **env},
            start_new_session=True,
        )
    try:
        proc.wait(1.0)
    except subprocess.TimeoutExpired:
        return proc.pid
    raise AttackError(f"the attack's hypervisor process exited at once ({proc.returncode}); see {log_path}")


def attack_host(state: LabState, host: str, kind: str, *, transient_ms: int | None = None) -> attacks.AttackRecord:
    """Apply ``kind`` to ``host``; the record says what :func:`heal_record` needs. Raises AttackError."""
    if host not in state.hosts:
        raise AttackError(f"no host {host!r} in lab {state.lab!r} (hosts: {', '.join(state.hosts)})")
    if state.hypervisor == "xen":
        if kind not in xen_attacks.KINDS:
            raise AttackError(f"a Xen lab knows the attacks {', '.join(xen_attacks.KINDS)}, not {kind!r}")
        image = xen_region.images()[0]
        if kind == xen_attacks.TOOLSTACK_KIND:
            ref = Dom0Reference.load(image.kernel, image.dom0_tools)
            return asyncio.run(xen_attacks.toolstack_code(_victim(state, host), ref))
        return asyncio.run(xen_attacks.xen_code(_victim(state, host), image.xen_syms))
    if kind not in KINDS:
        raise AttackError(
            f"unknown attack {kind!r}; the lab knows {', '.join(KINDS)} ({', '.join(xen_attacks.KINDS)} on Xen)"
        )
    if transient_ms is not None and kind not in ("patch", "patch-lib"):
        raise AttackError("--transient-ms applies to patch and patch-lib only")
    if kind in ("patch", "patch-lib"):
        pid = _victim(state, host)
        module = LIBRARY if kind == "patch-lib" else None
        if transient_ms is not None:
            return attacks.transient_patch(pid, transient_ms / 1000, module=module)
        return attacks.patch(pid, module=module)
    if kind == "anon-exec":
        return attacks.anon_exec(_victim(state, host))
    if kind in AGENT_KINDS:
        return _compromise_agent(state, host, kind)
    workdir = state.host_home(host) / "attack"
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "swap-binary":
        installed = shutil.which(DEFAULT_BINARY)
        if installed is None:
            raise AttackError(f"{DEFAULT_BINARY} is not installed")
        copy = workdir / DEFAULT_BINARY
        shutil.copy2(os.path.realpath(installed), copy)
        record = attacks.swap_binary(copy)
        pid = _start_hypervisor(state, host, str(copy), {})
    else:
        library = attacks.preload_library(workdir)
        pid = _start_hypervisor(state, host, DEFAULT_BINARY, {"LD_PRELOAD": str(library)})
        record = attacks.preload(library, pid)
    return attacks.AttackRecord(**{**record.to_json(), "pid": pid, "detail": {**record.detail, "lab_pid": pid}})


def _compromise_agent(state: LabState, host: str, kind: str) -> attacks.AttackRecord:
    from smig.lab import region

    region.stop_process(state, f"agent-{host}")
    if kind == "lie":
        pid = region.start_agent(state, host, lie_about=["*"])
    else:
        pid = region.start_agent(state, host, ignore_orders=True)
    state.save()
    return attacks.AttackRecord(
        id=f"{kind}-{pid}", kind=kind, pid=pid, path="[agent]", offset=0, length=0, applied_at=time.time(),
        detail={"host": host},
    )  # fmt: skip


def heal_record(record: attacks.AttackRecord, state: LabState | None = None) -> str:
    """Undo one lab attack: stop the hypervisor process it started, restore what it changed, or
    restart a compromised agent as it should be."""
    if record.kind in AGENT_KINDS:
        if state is None:
            return "the lab is gone; nothing to undo"
        from smig.lab import region

        host = str(record.detail["host"])
        region.stop_process(state, f"agent-{host}")
        region.start_agent(state, host)
        state.save()
        return f"restarted {host}'s agent as it should be"
    said = []
    lab_pid = record.detail.get("lab_pid")
    if lab_pid is not None:
        try:
            os.kill(int(lab_pid), signal.SIGKILL)
            said.append(f"stopped the hypervisor process {lab_pid} it started")
        except ProcessLookupError:
            pass
        if record.kind == "preload":
            return "; ".join(said) or "nothing left to undo"
    said.append(attacks.undo(record))
    return "; ".join(said)


def copied_binary(record: attacks.AttackRecord) -> Path | None:
    return Path(record.path) if record.kind == "swap-binary" else None
