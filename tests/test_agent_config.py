"""The agent's configuration file: the commented example is valid, and every mistake names its key."""

from __future__ import annotations

import pytest

from smig.agent.config import EXAMPLE, parse_config
from smig.errors import ConfigError


def test_the_printed_example_is_a_working_configuration() -> None:
    c = parse_config(EXAMPLE)
    assert (c.host, c.listen_host, c.listen_port) == ("h1", "10.77.0.2", 7443)
    assert c.orders_url == "https://10.77.0.2:7443"
    assert c.netns_of("h3") == "/run/netns/smig-lab-h3"
    assert c.migration_tls and c.monitoring and c.mean_interval_s == 1.0


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (("[agent]", "[agent]\nport = 1"), "port"),
        (('rctcb = "https://10.77.0.1:8443"', 'rctcb = "http://10.77.0.1:8443"'), "https://"),
        (('listen = "10.77.0.2:7443"', 'listen = "10.77.0.2"'), "agent.listen"),
        (('host = "h1"', ""), "host"),
        (('subject_netns = "/run/netns/smig-lab-{host}"', 'subject_netns = "/run/netns/x"'), "{host}"),
        (("mean_interval_s = 1.0", "mean_interval_s = -1"), "mean_interval_s"),
        (("[migration]", "[migrations]"), "[migrations]"),
    ],
)
def test_every_mistake_is_named(change: tuple[str, str], names: str) -> None:
    text = EXAMPLE.replace(*change, 1)
    assert text != EXAMPLE
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("{", r"\{")):
        parse_config(text)
