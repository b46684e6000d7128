"""The orchestrator's timing settings: an unusable value is refused with a message that says why."""

from __future__ import annotations

import pytest

from smig.errors import ConfigError
from smig.rctcb.orders import OrchestratorConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"completion_timeout_floor_s": 0}, "completion_timeout_floor_s must be a positive number"),
        ({"call_timeout_s": float("nan")}, "call_timeout_s must be a positive number"),
        ({"poll_interval_s": -1}, "poll_interval_s must be zero or more"),
        ({"max_attempts": 0}, "max_attempts must be a whole number of at least 1"),
        ({"progress_wait_s": 11}, "progress_wait_s must be 0-10 seconds"),
        ({"progress_wait_s": True}, "progress_wait_s must be 0-10 seconds"),
        ({"progress_wait_s": 5, "call_timeout_s": 5}, r"shorter than call_timeout_s \(5\)"),
    ],
)
def test_an_unusable_setting_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OrchestratorConfig(**kwargs)  # type: ignore[arg-type]


def test_the_defaults_wait_a_second_per_progress_call() -> None:
    config = OrchestratorConfig()
    assert config.progress_wait_s == 1.0 < config.call_timeout_s
    assert OrchestratorConfig(progress_wait_s=0).progress_wait_s == 0  # plain polling stays possible
