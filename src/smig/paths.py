"""Where SMIG keeps its files.

Runtime state (VM directories, sockets, PKI) lives under ``$SMIG_HOME`` (default ``~/.smig``).
Build products that are costly to remake and safe to share (the guest image, the accelerator
probe's verdict) live under ``$SMIG_CACHE`` (default ``$XDG_CACHE_HOME/smig``, else
``~/.cache/smig``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def smig_home(env: Mapping[str, str] | None = None) -> Path:
    """The root of SMIG's runtime state for this user or test run."""
    env = os.environ if env is None else env
    if env.get("SMIG_HOME"):
        return Path(env["SMIG_HOME"]).expanduser()
    return Path.home() / ".smig"


def smig_cache(env: Mapping[str, str] | None = None) -> Path:
    """The root of SMIG's build cache (guest images, accelerator verdicts)."""
    env = os.environ if env is None else env
    if env.get("SMIG_CACHE"):
        return Path(env["SMIG_CACHE"]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "smig"
    return Path.home() / ".cache" / "smig"
