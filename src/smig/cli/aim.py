"""``smig reference`` and ``smig measure``: AIM's reference manifests, and measuring now."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from smig.aim import procfs, reference, xen_syms
from smig.aim.keys import ensure_private_key
from smig.aim.measure import Measurement, Measurer
from smig.aim.monitor import Monitor, Observation, Subject
from smig.aim.report import encode_report
from smig.aim.schedule import Schedule
from smig.aim.xen_dom0 import Dom0Reference
from smig.aim.xen_measure import measure_xen
from smig.aim.xen_memory import OuterQemu
from smig.cli.common import emit_json, fail, out
from smig.errors import SmigError
from smig.lab.xen_image import XenImageBuilder
from smig.model import HashAlgorithm, Verdict
from smig.paths import smig_cache, smig_home

app = typer.Typer(
    help=(
        "Reference manifests: the signed digests of known-good hypervisor code and files, built from "
        "files on a machine you trust, never from a host being judged."
    ),
    no_args_is_help=True,
)

_REFERENCE = typer.Option(None, "--reference", help="Signed manifest to judge against [default: $SMIG_HOME's].")
_KEY = typer.Option(None, "--key", help="PEM public key the manifest must be signed with [default: this home's].")
_JSON = typer.Option(False, "--json", help="Print JSON.")


def _fingerprint(pem: str) -> str:
    return hashlib.sha256(pem.encode()).hexdigest()[:16]


@app.command()
def build(
    files: list[Path] = typer.Argument(None, help="ELF binaries and other files to vouch for."),
    out_file: Path | None = typer.Option(None, "--out", help="Where to write [default: $SMIG_HOME/reference]."),
    algorithm: HashAlgorithm = typer.Option(HashAlgorithm.BLAKE3, "--algorithm", help="Digest to use."),
    agent: bool = typer.Option(True, "--agent/--no-agent", help="Include SMIG's own code (with no FILES)."),
    as_json: bool = _JSON,
) -> None:
    """Build and sign a reference manifest.

    With no FILES: the installed QEMU, its modules, every library they load, the firmware and
    option ROMs a VM loads, and SMIG's own code. The manifest is signed with this home's reference
    key ($SMIG_HOME/keys/reference.pem, generated on first use).
    """
    home = smig_home()
    try:
        chosen = (
            list(files) if files else [*reference.installed_qemu_files(), *(reference.agent_files() if agent else [])]
        )
        missing = [str(p) for p in chosen if not p.is_file()]
        if missing:
            fail(f"not a file: {', '.join(missing)}")
        manifest = reference.build(chosen, algorithm=algorithm)
        document = reference.sign(manifest, reference.signing_key(home))
        target = out_file or reference.default_manifest_path(home)
        reference.save(document, target)
    except SmigError as e:
        fail(str(e))
    summary = {
        "path": str(target),
        "algorithm": manifest.algorithm.value,
        "modules": len(manifest.modules),
        "files": len(manifest.files),
        "segments": sum(len(m.segments) for m in manifest.modules.values()),
        "kernel_release": manifest.kernel_release,
        "signer": _fingerprint(document["signer"]),
    }
    if as_json:
        emit_json(summary)
    else:
        out.print(
            f"reference manifest written to {target}: {summary['modules']} modules, {summary['files']} files, "
            f"{manifest.algorithm.value}, signed by {summary['signer']}"
        )


def _load(path: Path | None, key: Path | None) -> tuple[Path, reference.Manifest]:
    home = smig_home()
    path = path or reference.default_manifest_path(home)
    return path, reference.load(path, reference.trusted_key(home, key))


@app.command()
def show(
    path: Path | None = typer.Argument(None, help="Manifest [default: $SMIG_HOME's]."),
    key: Path | None = _KEY,
    modules: bool = typer.Option(False, "--modules", help="List every module and its segments."),
    as_json: bool = _JSON,
) -> None:
    """Show what a (verified) manifest vouches for."""
    try:
        where, manifest = _load(path, key)
    except SmigError as e:
        fail(str(e))
    data: dict[str, Any] = {
        "path": str(where),
        "algorithm": manifest.algorithm.value,
        "leaf_size": manifest.leaf_size,
        "created_at": manifest.created_at,
        "kernel_release": manifest.kernel_release,
        "modules": len(manifest.modules),
        "files": len(manifest.files),
        "kernel_pages": sorted(manifest.kernel_pages),
        "tcg_buffer_max": manifest.tcg_buffer_max,
    }
    if modules:
        data["module_list"] = {
            p: [{"offset": s.offset, "length": s.length, "digest": s.digest} for s in m.segments]
            for p, m in sorted(manifest.modules.items())
        }
    if as_json:
        emit_json(data)
        return
    for k, v in data.items():
        if k != "module_list":
            out.print(f"{k:15} {v}", markup=False, soft_wrap=True)
    for p, segs in data.get("module_list", {}).items():
        for s in segs:
            out.print(f"  {p}  {s['offset']:#x}+{s['length']:#x}  {s['digest'][:16]}", markup=False, soft_wrap=True)


@app.command()
def verify(
    path: Path | None = typer.Argument(None, help="Manifest [default: $SMIG_HOME's]."),
    key: Path | None = _KEY,
    files: bool = typer.Option(False, "--files", help="Also compare the files on this machine with the manifest."),
    as_json: bool = _JSON,
) -> None:
    """Check a manifest's signature (and, with --files, this machine's files). Exit 1 if it fails."""
    try:
        where, manifest = _load(path, key)
        differ = []
        if files:
            result = Measurer(manifest).measure([], files=True)
            differ = [{"path": m.path, "reason": m.reason} for m in result.mismatches]
    except SmigError as e:
        if as_json:
            emit_json({"valid": False, "error": str(e)})
        fail(str(e))
    if as_json:
        emit_json({"valid": not differ, "path": str(where), "signature": "ok", "differing_files": differ})
    else:
        out.print(f"{where}: signature ok")
        for d in differ:
            out.print(f"  [red]{d['path']}[/red]: {d['reason']}")
    if differ:
        raise typer.Exit(1)


def _netns(host: str) -> str:
    """The namespace file for ``host``: a name under /run/netns, or a path as given."""
    netns = host if "/" in host else f"/run/netns/{host}"
    if not os.path.exists(netns):
        fail(f"no network namespace {netns}")
    return netns


def _measurement_json(m: Measurement, algorithm: HashAlgorithm) -> dict[str, Any]:
    return {
        "verdict": m.verdict.value,
        "elapsed_ms": round(m.elapsed_ms, 3),
        "bytes": m.bytes,
        "mismatches": [
            {"path": x.path, "offset": x.offset, "length": x.length, "reason": x.reason, "pid": x.pid}
            for x in m.mismatches
        ],
        "root": m.root,
        "algorithm": algorithm.value,
        "pids": list(m.pids),
        "gone": list(m.gone),
        "targets": len(m.targets),
        "notes": list(m.notes),
    }


def _measure_xen(pid: int, syms_path: Path | None, *, dom0: bool, strict: bool, as_json: bool) -> None:
    try:
        outer = OuterQemu.of(pid)
        image = XenImageBuilder(smig_cache()).load()
        syms = xen_syms.load(syms_path or image.xen_syms)
        reference = Dom0Reference.load(image.kernel, image.dom0_tools) if dom0 else None
        result = asyncio.run(measure_xen(pid, outer.memory_mib, outer.qmp_socket, syms, dom0=reference))
    except SmigError as e:
        fail(str(e))
    if as_json:
        emit_json(
            {
                "verdict": result.verdict.value,
                "elapsed_ms": round(result.elapsed_ms, 3),
                "bytes": result.bytes,
                "mismatches": [
                    {"path": x.path, "offset": x.offset, "length": x.length, "reason": x.reason, "pid": pid}
                    for x in result.mismatches
                ],
                "root": result.targets[0].digest if result.targets else "",
                "algorithm": HashAlgorithm.BLAKE3.value,
                "pids": [pid],
                "targets": len(result.targets),
                "measured": [t.target for t in result.targets],
                "xen_build_id": syms.build_id,
                "text_physical_address": result.text_phys,
            }
        )
    else:
        colour = "green" if result.verdict is Verdict.MATCH else "red"
        out.print(
            f"[{colour}]{result.verdict.value}[/{colour}]: Xen {syms.build_id[:12]} code, "
            f"{result.bytes / 1e6:.1f} MB at guest-physical {result.text_phys:#x}, in {result.elapsed_ms:.1f} ms"
        )
        for t in result.targets[1:]:
            out.print(f"  measured {t.target}", markup=False, soft_wrap=True)
        for x in result.mismatches:
            out.print(f"  {x.path} {x.offset:#x}+{x.length:#x}: {x.reason}", markup=False, soft_wrap=True)
    if strict and result.verdict is Verdict.MISMATCH:
        raise typer.Exit(3)


def measure(
    pid: list[int] = typer.Option(None, "--pid", help="Process to measure (repeatable)."),
    host: str | None = typer.Option(
        None, "--host", help="Network namespace (name under /run/netns, or a path) whose hypervisors to measure."
    ),
    all_local: bool = typer.Option(False, "--all", help="Every hypervisor process on this machine."),
    xen: int | None = typer.Option(
        None, "--xen", help="The outer QEMU of a nested Xen host: measure its Xen hypervisor's code from outside."
    ),
    xen_syms: Path | None = typer.Option(None, "--xen-syms", help="Xen's xen-syms [default: the Xen host image's]."),
    dom0: bool = typer.Option(
        True, "--dom0/--no-dom0", help="With --xen, also measure dom0's toolstack (xenstored, xenconsoled, xl)."
    ),
    reference_file: Path | None = _REFERENCE,
    key: Path | None = _KEY,
    files: bool | None = typer.Option(
        None, "--files/--no-files", help="Also hash the manifest's files on disk [default: on for --host/--all]."
    ),
    cow: bool = typer.Option(True, "--cow/--no-cow", help="Also use the copy-on-write signal of written code pages."),
    strict: bool = typer.Option(False, "--strict", help="Exit 3 on a mismatch (exit 0 otherwise)."),
    as_json: bool = _JSON,
) -> None:
    """Measure hypervisor code now against the reference manifest and print the verdict.

    A mismatch names the module (or [anon] for anonymous executable memory, whose offset is then
    its address), the file offset range that differs, and why.

    With --xen, the Xen hypervisor of a nested host is read from its outer QEMU's memory, through
    the host's own page tables, and judged against xen-syms from the Xen package: a mismatch is
    "xen:.text", its offset into Xen's code, and the function it hit. dom0's toolstack processes
    are found along dom0's task list and their code judged against the package's files: a
    mismatch is "dom0:PATH" and the file offset.
    """
    if sum(map(bool, (pid, host, all_local, xen is not None))) != 1:
        fail("name what to measure: --pid PID (repeatable), --host NETNS, --all, or --xen PID")
    if xen is not None:
        _measure_xen(xen, xen_syms, dom0=dom0, strict=strict, as_json=as_json)
        return
    try:
        _, manifest = _load(reference_file, key)
        file_root = Path("/")
        if pid:
            for p in pid:
                if not Path(f"/proc/{p}").is_dir():
                    fail(f"no process {p}")
            pids = list(pid)
        else:
            pids = procfs.hypervisor_pids(_netns(host) if host is not None else None)
            if pids:
                file_root = Path(f"/proc/{pids[0]}/root")  # the files as the subject's processes see them
        result = Measurer(manifest, cow_check=cow).measure(
            pids, files=files if files is not None else not pid, file_root=file_root
        )
    except SmigError as e:
        fail(str(e))
    if as_json:
        emit_json(_measurement_json(result, manifest.algorithm))
    else:
        colour = "green" if result.verdict is Verdict.MATCH else "red"
        out.print(
            f"[{colour}]{result.verdict.value}[/{colour}]: {len(result.pids)} process(es), "
            f"{len(result.targets)} targets, "
            f"{result.bytes / 1e6:.1f} MB in {result.elapsed_ms:.1f} ms"
        )
        for x in result.mismatches:
            out.print(f"  {x.path} {x.offset:#x}+{x.length:#x} (pid {x.pid}): {x.reason}", markup=False, soft_wrap=True)
        for note in result.notes:
            out.print(f"  {note}", style="dim", markup=False, soft_wrap=True)
        if result.gone:
            out.print(f"  [dim]exited while measured: {', '.join(map(str, result.gone))}[/dim]")
    if strict and result.verdict is Verdict.MISMATCH:
        raise typer.Exit(3)


def monitor(
    host: str | None = typer.Option(None, "--host", help="Network namespace of the subject (name or path)."),
    pid: list[int] = typer.Option(None, "--pid", help="Subject processes instead of a namespace (repeatable)."),
    subject: str = typer.Option("subject", "--subject", help="The subject's host id in the reports."),
    monitor_id: str = typer.Option("monitor", "--id", help="This monitor's host id in the reports."),
    interval: float = typer.Option(1.0, "--interval", min=0.001, help="Mean seconds between measurements."),
    jitter: float = typer.Option(0.5, "--jitter", min=0.0, max=0.99, help="Intervals are mean * (1 +- jitter)."),
    cpu_share: float = typer.Option(0.25, "--cpu-share", min=0.01, max=1.0, help="Most of a core measuring may use."),
    rounds: int | None = typer.Option(
        None, "--rounds", min=1, help="Stop after this many [default: run until Ctrl-C]."
    ),
    reference_file: Path | None = _REFERENCE,
    key: Path | None = _KEY,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line per round: the report and its wire form."),
) -> None:
    """Measure a subject at randomised times and print each signed report, as an agent's monitor does.

    Reports are signed with $SMIG_HOME/keys/monitor.pem (generated on first use).
    """
    if bool(host) == bool(pid):
        fail("name the subject: --host NETNS or --pid PID")
    try:
        _, manifest = _load(reference_file, key)
        if host is not None:
            netns = _netns(host)
            target = Subject(subject, lambda: procfs.hypervisor_pids(netns))
        else:
            fixed = list(pid)
            target = Subject(subject, lambda: [p for p in fixed if Path(f"/proc/{p}").is_dir()], files=False)
        mon = Monitor(
            monitor_id,
            ensure_private_key(smig_home() / "keys" / "monitor.pem"),
            Measurer(manifest),
            Schedule(mean_interval_s=interval, jitter=jitter),
            max_cpu_share=cpu_share,
        )
    except SmigError as e:
        fail(str(e))

    def emit(o: Observation) -> None:
        r = o.report
        if as_json:
            line = {"report": json.loads(encode_report(r)), "wire": o.signed.to_wire().decode()}
            sys.stdout.write(json.dumps(line, sort_keys=True) + "\n")
            sys.stdout.flush()
            return
        colour = "green" if r.verdict is Verdict.MATCH else "red"
        out.print(
            f"#{r.sequence} [{colour}]{r.verdict.value}[/{colour}] {len(o.measurement.pids)} process(es) "
            f"{o.measurement.elapsed_ms:.1f} ms {o.cpu_s * 1000:.1f} ms CPU",
            soft_wrap=True,
        )
        for x in r.mismatches:
            out.print(
                f"   {x.path} {x.offset:#x}+{x.length:#x} (pid {x.pid}): {x.reason}", markup=False, soft_wrap=True
            )

    try:
        asyncio.run(mon.run(target, emit, rounds=rounds))
    except KeyboardInterrupt:
        pass
    finally:
        mon.close()
