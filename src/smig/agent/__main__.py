"""``python3 -m smig.agent CONFIG``: the agent alone, without the CLI around it.

What a Xen host's dom0 runs (smig.lab.xen_region): it imports the agent's own code and its
libraries, not every command's (the CLI pulls in rich's Markdown and more), which keeps the
code dom0 must load, and be trusted with, smaller, and its start faster under TCG.
Same behaviour as ``smig agent run --config CONFIG``: logs to stderr, exit 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from smig.agent.config import load_config
from smig.agent.service import run_agent
from smig.errors import SmigError


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python3 -m smig.agent CONFIG   (the agent's TOML file; see `smig agent config`)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(Path(argv[0]))
        asyncio.run(run_agent(config, ready=lambda: print(f"agent of {config.host} ready", flush=True)))
    except SmigError as e:
        print(f"smig agent: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
