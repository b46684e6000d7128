"""What every ``smig`` subcommand shares: the driver it builds, JSON output, error exits."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from smig.errors import SmigError
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.model import Accel, TLSConfig
from smig.paths import smig_cache, smig_home

T = TypeVar("T")

out = Console()
err = Console(stderr=True)


def driver(accel: Accel | None = None, tls: TLSConfig | None = None) -> QemuDriver:
    """The QEMU driver for this machine, configured from the environment."""
    return QemuDriver(QemuConfig(home=smig_home(), cache=smig_cache(), accel=accel, tls=tls))


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit with a one-line error on stderr."""
    print(f"smig: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an async command body, turning SMIG's errors into a one-line message and exit 1."""
    try:
        return asyncio.run(coro_fn())
    except SmigError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def emit_json(data: Any) -> None:
    """Print one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
