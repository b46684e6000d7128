"""The RC-TCB's configuration file: the commented example is valid, and every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from smig.errors import ConfigError
from smig.rctcb.server import example_config, parse_config


def test_the_printed_example_is_a_working_configuration(tmp_path: Path) -> None:
    c = parse_config(example_config(tmp_path))
    assert c.orchestrator.progress_wait_s == 1.0 and c.orchestrator.call_timeout_s == 30.0
    limits = c.placement
    assert (limits.max_outbound_per_host, limits.max_inbound_per_host, limits.max_per_region) == (2, 2, 5)
    assert limits.prepare_ahead == 2


def test_the_placement_limits_are_read() -> None:
    c = parse_config('[rctcb]\nlisten = "127.0.0.1:8443"\n[placement]\nprepare_ahead = 0\nmax_per_region = 9\n')
    assert (c.placement.prepare_ahead, c.placement.max_per_region, c.placement.max_outbound_per_host) == (0, 9, 2)


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (("prepare_ahead = 2", "prepare_ahead = -1"), "prepare_ahead"),
        (("max_per_region = 5", "max_per_region = 2.5"), "max_per_region"),
        (("max_outbound_per_host = 2", "max_outbound_per_host = 0"), "max_outbound_per_host"),
        (("progress_wait_s = 1.0", "progress_wait_s = 30.0"), "progress_wait_s"),
        (("[placement]", "[placements]"), "placements"),
        (("prepare_ahead = 2", "prepare_ahead = 2\nslots = 3"), "slots"),
    ],
)
def test_every_mistake_is_named(tmp_path: Path, change: tuple[str, str], names: str) -> None:
    example = example_config(tmp_path)
    text = example.replace(*change, 1)
    assert text != example
    with pytest.raises(ConfigError, match=names):
        parse_config(text)
