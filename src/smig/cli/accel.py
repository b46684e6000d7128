"""``smig accel``: which accelerator this machine uses for guests, and why."""

from __future__ import annotations

import typer

from smig.cli.common import driver, emit_json, out, run
from smig.hypervisor.accel import gather_facts, parse_override


def accel(
    override: str = typer.Option("auto", "--accel", help="auto, kvm or tcg."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the accelerator guests run under here (KVM only where a Linux guest really boots)."""

    async def body() -> None:
        chosen, reason = await driver(parse_override(override)).accelerator()
        facts = gather_facts()
        if as_json:
            emit_json(
                {
                    "accel": chosen.value,
                    "reason": reason,
                    "kvm_device_usable": facts.kvm_device_usable,
                    "kvm_modules": sorted(facts.kvm_modules),
                }
            )
        else:
            out.print(f"[bold]{chosen.value}[/bold]: {reason}")

    run(body)
