"""``smig``: the entry point and its command groups."""

from __future__ import annotations

import typer

from smig import __version__
from smig.cli import accel as accel_cmd
from smig.cli import agent, aim, attack, bench, ca, demo, image, ivt, lab, rctcb, vm, vm_demo
from smig.cli.common import setup_logging

app = typer.Typer(
    help=(
        "SMIG moves VMs live off a hypervisor that stopped being trustworthy onto trusted ones.\n\n"
        "State lives under $SMIG_HOME (default ~/.smig); the guest image and the accelerator "
        "verdict are cached under $SMIG_CACHE (default ~/.cache/smig)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
vm.app.command("demo")(vm_demo.demo)
app.add_typer(vm.app, name="vm")
app.add_typer(image.app, name="image")
app.add_typer(aim.app, name="reference")
app.command("measure")(aim.measure)
app.command("monitor")(aim.monitor)
app.add_typer(attack.app, name="attack")
app.command("accel")(accel_cmd.accel)
app.command("demo")(demo.demo)
app.command("ivt")(ivt.ivt)
app.command("migrations")(ivt.migrations)
app.add_typer(ivt.audit_app, name="audit")
app.add_typer(ca.app, name="ca")
app.add_typer(rctcb.app, name="rctcb")
app.add_typer(bench.app, name="bench")
app.add_typer(agent.app, name="agent")
app.add_typer(lab.app, name="lab")


def _version(value: bool) -> None:
    if value:
        print(f"smig {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what SMIG does to stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    setup_logging(verbose)


def main() -> None:
    app()
