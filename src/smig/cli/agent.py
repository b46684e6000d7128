"""``smig agent``: the per-host daemon that enrols, measures its neighbours and carries out orders."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import typer

from smig.cli.common import fail, out

app = typer.Typer(
    help=(
        "The per-host agent: enrols its host with the RC-TCB (mutual TLS), runs the monitors the RC-TCB "
        "assigns it and submits their signed reports, carries out migration orders, and reports the VMs it runs.\n\n"
        "  smig agent config > agent.toml     # edit: host id, addresses, certificate paths\n\n"
        "  smig agent run --config agent.toml"
    ),
    no_args_is_help=True,
)


@app.command("run")
def run_command(
    config: Path = typer.Option(..., "--config", "-c", help="TOML file; `smig agent config` prints a commented one."),
    json_out: bool = typer.Option(False, "--json", help="Print the ready line as JSON (for scripts)."),
) -> None:
    """Run the agent until SIGINT or SIGTERM; its VMs keep running when it stops.

    It listens on exactly `[agent] listen` (the RC-TCB's orders) and nowhere else, keeps trying
    while the RC-TCB is unreachable, and re-syncs when it comes back.
    """
    from smig.agent.config import load_config
    from smig.agent.service import run_agent
    from smig.errors import SmigError

    try:
        settings = load_config(config)
    except SmigError as e:
        fail(e.message)

    def ready() -> None:
        monitor_only = settings.role == "monitor"
        if json_out:
            listening = None if monitor_only else settings.orders_url
            line = {"host": settings.host, "role": settings.role, "listening": listening, "pid": os.getpid()}
            print(json.dumps(line), flush=True)
        elif monitor_only:
            out.print(f"monitor of {settings.host}: measuring its subjects for RC-TCB {settings.rctcb} (no orders)")
        else:
            out.print(f"agent of {settings.host}: orders on {settings.orders_url}, RC-TCB {settings.rctcb}")

    try:
        asyncio.run(run_agent(settings, ready=ready))
    except SmigError as e:
        fail(e.message)
    except KeyboardInterrupt:
        pass


@app.command("config")
def config_command() -> None:
    """Print a commented example configuration."""
    from smig.agent.config import EXAMPLE

    print(EXAMPLE, end="")
