"""``smig rctcb``: run the Region Critical TCB, the one trusted service of a region."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import typer

from smig.cli.common import fail, out
from smig.errors import SmigError
from smig.rctcb.server import example_config, load_config, serve

app = typer.Typer(
    help=(
        "The Region Critical TCB: keeps the Integrity Validation Table, turns monitors' signed reports into "
        "trust states, and decides when and where VMs move.\n\n"
        "Set up a region once:\n\n"
        "  smig ca init --region r1\n\n"
        "  smig ca issue rctcb --role rctcb\n\n"
        "  smig rctcb config > rctcb.toml\n\n"
        "  smig rctcb serve --config rctcb.toml"
    ),
    no_args_is_help=True,
)


@app.command("serve")
def serve_command(
    config: Path = typer.Option(..., "--config", "-c", help="TOML file; `smig rctcb config` prints a commented one."),
    json_out: bool = typer.Option(False, "--json", help="Print the ready line as JSON (for scripts)."),
) -> None:
    """Serve the RC-TCB's HTTPS API (mutual TLS) on the one address the configuration names.

    Prints one line when it listens, then runs until SIGINT or SIGTERM.
    """
    try:
        settings = load_config(config)
    except SmigError as e:
        fail(e.message)

    def ready(host: str, port: int) -> None:
        where = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
        if json_out:
            line = {"listening": where, "host": host, "port": port, "store": settings.store, "pid": os.getpid()}
            print(json.dumps(line), flush=True)
        else:
            out.print(f"RC-TCB listening on {where} (store {settings.store}); Ctrl-C stops it")

    try:
        asyncio.run(serve(settings, ready=ready))
    except SmigError as e:
        fail(e.message)
    except KeyboardInterrupt:
        pass


@app.command("config")
def config_command() -> None:
    """Print a commented example configuration, with paths under $SMIG_HOME."""
    print(example_config(), end="")
