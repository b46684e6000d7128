"""Replacing one benchmark's section of docs/BENCHMARKS.md, shared by `smig bench all` and the bench scripts."""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The comments that delimit benchmark ``name``'s section."""
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between ``name``'s markers in ``path``, or append the section if it is new."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
