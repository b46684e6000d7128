"""What SMIG's TOML configuration files share: known sections and keys only, numbers that are
numbers, and one ``ADDRESS:PORT`` to listen on. Every error names the key and the file."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from typing import Any

from smig.errors import ConfigError

__all__ = ["listen_address", "load_sections", "number"]


def load_sections(text: str, sections: Mapping[str, frozenset[str]], source: str) -> dict[str, dict[str, Any]]:
    """The file's sections (every one in ``sections`` present, empty if absent). Raises ConfigError
    for invalid TOML, an unknown section or an unknown key: a misspelt key is an error, not a default."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}") from e
    for name, section in data.items():
        if name not in sections or not isinstance(section, dict):
            raise ConfigError(f"unknown section [{name}] in {source}; the sections are {', '.join(sorted(sections))}")
        unknown = set(section) - sections[name]
        if unknown:
            allowed = ", ".join(sorted(sections[name]))
            raise ConfigError(
                f"unknown key(s) {', '.join(sorted(unknown))} in [{name}] of {source}; allowed: {allowed}"
            )
    return {name: dict(data.get(name, {})) for name in sections}


def number(section: Mapping[str, Any], key: str, default: float, *, positive: bool = False) -> float:
    """``section[key]`` (or ``default``) as a finite number; ``positive`` refuses zero and below."""
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a number, not {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{key} must be positive, not {value!r}")
    return float(value)


def listen_address(value: object, key: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` (``[v6]:PORT`` too) as ``(address, port)``; an address is required, so a
    service never listens on every interface by accident."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key} must be 'ADDRESS:PORT' (e.g. '127.0.0.1:8443'), not {value!r}")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        port_number = int(port)
    except ValueError:
        raise ConfigError(f"{key} has no valid port in {value!r}") from None
    if not 0 <= port_number <= 65535:
        raise ConfigError(f"{key} port {port_number} is outside 0-65535")
    if not host:
        raise ConfigError(f"{key} needs an address: name the one interface to listen on, e.g. 127.0.0.1")
    return host, port_number
