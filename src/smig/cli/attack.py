"""``smig attack``: tamper with a hypervisor for the lab and the tests, and undo it.

Every applied attack is recorded under ``$SMIG_HOME/attacks/ID.json`` and printed (``--json``),
so ``smig attack undo ID`` (or ``--all``, or ``--record FILE``) can put things back.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import typer

from smig.aim.xen_dom0 import Dom0Reference
from smig.cli.common import emit_json, fail, out
from smig.errors import SmigError
from smig.lab import attacks, xen_attacks
from smig.lab.attacks import AttackRecord
from smig.lab.xen_image import XenImageBuilder
from smig.paths import smig_cache, smig_home

app = typer.Typer(
    help=(
        "Tamper with a hypervisor so AIM has something to find (lab and tests only). "
        "Each attack prints a record; `smig attack undo` restores what it changed."
    ),
    no_args_is_help=True,
)
_PID = typer.Option(..., "--pid", help="The running hypervisor process to attack.")
_JSON = typer.Option(False, "--json", help="Print the attack record as JSON.")


def _records() -> Path:
    return smig_home() / "attacks"


def _save(record: AttackRecord) -> None:
    _records().mkdir(parents=True, exist_ok=True)
    (_records() / f"{record.id}.json").write_text(json.dumps(record.to_json(), indent=1) + "\n")


def _report(record: AttackRecord, as_json: bool, *, extra: dict[str, object] | None = None) -> None:
    if as_json:
        emit_json({**record.to_json(), **(extra or {}), "undo": f"smig attack undo {record.id}"})
    else:
        where = f"process {record.pid}" if record.pid else "disk"
        out.print(
            f"{record.kind} applied ({record.id}): {record.path} at {record.offset:#x}+{record.length:#x} on {where}; "
            f"undo with `smig attack undo {record.id}`",
            markup=False,
            soft_wrap=True,
        )


@app.command()
def patch(
    pid: int = _PID,
    module: str | None = typer.Option(None, "--module", help="Library to patch (part of its path) [default: binary]."),
    offset: int | None = typer.Option(None, "--offset", help="Offset into the module's code mapping [default: inert]."),
    length: int = typer.Option(1, "--length", min=1, max=4096, help="Bytes to flip."),
    transient_ms: float | None = typer.Option(
        None, "--transient-ms", min=0, help="Restore the code by itself after this long (the command waits)."
    ),
    as_json: bool = _JSON,
) -> None:
    """Flip bytes of code in a running process through /proc/PID/mem."""
    try:
        if transient_ms is not None:
            record = attacks.transient_patch(pid, transient_ms / 1000, module, offset)
            _report(record, as_json, extra={"restored": True, "transient_ms": transient_ms})
            return
        record = attacks.patch(pid, module, offset, length)
    except SmigError as e:
        fail(str(e))
    _save(record)
    _report(record, as_json)


@app.command("anon-exec")
def anon_exec(
    pid: int = _PID,
    length: int = typer.Option(4096, "--length", min=4096, help="Bytes to map."),
    as_json: bool = _JSON,
) -> None:
    """Make a running process map anonymous executable memory (through ptrace)."""
    try:
        record = attacks.anon_exec(pid, length)
    except SmigError as e:
        fail(str(e))
    _save(record)
    _report(record, as_json)


@app.command("swap-binary")
def swap_binary(
    binary: Path | None = typer.Option(None, "--binary", help="Binary to replace [default: the installed QEMU]."),
    as_json: bool = _JSON,
) -> None:
    """Replace a hypervisor binary on disk with a modified copy; VMs started next run it."""
    target = binary or (Path(p) if (p := shutil.which("qemu-system-x86_64")) else None)
    if target is None:
        fail("no QEMU binary found; name one with --binary")
    try:
        record = attacks.swap_binary(target)
    except SmigError as e:
        fail(str(e))
    _save(record)
    _report(record, as_json)


@app.command("xen-code")
def xen_code(
    pid: int = typer.Option(..., "--pid", help="The outer QEMU of a nested Xen host (`smig lab` started it)."),
    function: str = typer.Option(xen_attacks.DEFAULT_FUNCTION, "--function", help="Xen function to patch."),
    offset: int = typer.Option(xen_attacks.DEFAULT_OFFSET, "--offset", min=0, help="Offset into the function."),
    length: int = typer.Option(1, "--length", min=1, max=64, help="Bytes to flip."),
    syms: Path | None = typer.Option(None, "--syms", help="Xen's xen-syms [default: the Xen host image's]."),
    as_json: bool = _JSON,
) -> None:
    """Flip bytes of the Xen hypervisor's code from outside its host, in the outer QEMU's memory.

    The address is translated through the nested host's own page tables, so the live code is hit.
    The default, do_kexec_op+0x8, is a hypercall a lab host never makes: Xen keeps running.
    """
    try:
        path = syms or XenImageBuilder(smig_cache()).load().xen_syms
        record = asyncio.run(xen_attacks.xen_code(pid, path, function=function, offset=offset, length=length))
    except SmigError as e:
        fail(str(e))
    _save(record)
    _report(record, as_json, extra={"function": record.detail["function"]})


@app.command("xen-toolstack")
def xen_toolstack(
    pid: int = typer.Option(..., "--pid", help="The outer QEMU of a nested Xen host (`smig lab` started it)."),
    tool: str = typer.Option(xen_attacks.DEFAULT_TOOL, "--tool", help="xenstored, xenconsoled or xl."),
    offset: int | None = typer.Option(
        None, "--offset", min=0, help="Offset into the tool's code [default: its last byte, _fini's ret]."
    ),
    as_json: bool = _JSON,
) -> None:
    """Flip a byte of a dom0 toolstack process's code from outside its host, in the outer QEMU's memory.

    The process is found along dom0's task list and the address translated through its own page
    table, as a monitor does. The default byte only runs when the process exits: it keeps working.
    """
    try:
        image = XenImageBuilder(smig_cache()).load()
        ref = Dom0Reference.load(image.kernel, image.dom0_tools)
        record = asyncio.run(xen_attacks.toolstack_code(pid, ref, tool=tool, offset=offset))
    except SmigError as e:
        fail(str(e))
    _save(record)
    _report(record, as_json, extra={"function": record.detail["function"]})


@app.command()
def preload(as_json: bool = _JSON) -> None:
    """Build the library to inject into a new hypervisor process, and print how to use it."""
    try:
        lib = attacks.preload_library(smig_cache() / "lab")
    except SmigError as e:
        fail(str(e))
    if as_json:
        emit_json({"kind": "preload", "library": str(lib), "env": {"LD_PRELOAD": str(lib)}})
    else:
        out.print(f"start a hypervisor with LD_PRELOAD={lib} to inject it", markup=False, soft_wrap=True)


@app.command()
def undo(
    attack_id: str | None = typer.Argument(None, help="The id printed by the attack."),
    record_file: Path | None = typer.Option(None, "--record", help="An attack's JSON record ('-' for stdin)."),
    undo_all: bool = typer.Option(False, "--all", help="Undo every attack recorded in $SMIG_HOME."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Undo attacks: restore code, unmap memory, put binaries back."""
    if sum(map(bool, (attack_id, record_file, undo_all))) != 1:
        fail("name what to undo: an attack id, --record FILE, or --all")
    paths: list[Path | None] = []
    records: list[AttackRecord] = []
    try:
        if record_file is not None:
            text = sys.stdin.read() if str(record_file) == "-" else record_file.read_text()
            records.append(AttackRecord.from_json(json.loads(text)))
            paths.append(_records() / f"{records[0].id}.json")
        else:
            files = sorted(_records().glob("*.json")) if undo_all else [_records() / f"{attack_id}.json"]
            for f in files:
                if not f.exists():
                    fail(f"no attack {attack_id!r} is recorded in {_records()}; see `smig attack list`")
                records.append(AttackRecord.from_json(json.loads(f.read_text())))
                paths.append(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read the attack record: {e}")
    except SmigError as e:
        fail(str(e))
    done = []
    for record, path in zip(records, paths, strict=True):
        try:
            what = attacks.undo(record)
        except SmigError as e:
            fail(f"{record.id}: {e}")
        if path is not None:
            path.unlink(missing_ok=True)
        done.append({"id": record.id, "kind": record.kind, "done": what})
    if as_json:
        emit_json({"undone": done})
    else:
        for d in done:
            out.print(f"{d['id']}: {d['done']}", markup=False, soft_wrap=True)
        if not done:
            out.print("nothing to undo")


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the attacks recorded and not yet undone."""
    records = [json.loads(f.read_text()) for f in sorted(_records().glob("*.json"))] if _records().exists() else []
    if as_json:
        emit_json({"attacks": records})
        return
    for r in records:
        out.print(f"{r['id']}  {r['kind']}  pid {r['pid']}  {r['path']} {r['offset']:#x}", markup=False)
    if not records:
        out.print("no attacks applied")
