"""The lab's names, addresses and shaping parameters, without building anything."""

from __future__ import annotations

import pytest

from imageswarm.daemon.lab.errors import LabError
from imageswarm.daemon.lab.plan import IFNAMSIZ, MAX_NODES, LabPlan
from imageswarm.daemon.lab.shaping import burst_bytes, loss_ruleset, parse_loss, parse_rate


def test_every_name_fits_a_link_name_and_carries_the_labs_prefix() -> None:
    plan = LabPlan(255, MAX_NODES)
    names = [plan.bridge, *(h.link for h in plan.hosts), *(h.netns for h in plan.hosts)]
    assert all(len(n) <= IFNAMSIZ and n.startswith("isw255-") for n in names)
    links = {plan.bridge, *(h.link for h in plan.hosts)}
    assert len(links) == 1 + len(plan.hosts)  # one veth end per host, and the bridge


def test_addresses_come_from_the_labs_own_24_in_the_benchmarking_range() -> None:
    plan = LabPlan(7, 3)
    assert [(h.name, h.ip) for h in plan.hosts] == [
        ("controller", "198.18.7.1"),
        ("node1", "198.18.7.11"),
        ("node2", "198.18.7.12"),
        ("node3", "198.18.7.13"),
    ]
    assert plan.gateway == "198.18.7.254" and plan.cidr == "198.18.7.0/24"
    assert plan.controller_url == "http://198.18.7.1:7700"
    assert plan.host("isw7-node2").name == "node2"
    with pytest.raises(LabError, match="no host 'node4'"):
        plan.host("node4")


@pytest.mark.parametrize(("subnet", "nodes"), [(256, 1), (-1, 1), (0, 0), (0, MAX_NODES + 1)])
def test_out_of_range_labs_are_refused(subnet: int, nodes: int) -> None:
    with pytest.raises(LabError):
        LabPlan(subnet, nodes)


def test_rates_in_tc_notation() -> None:
    assert parse_rate("200mbit") == 200_000_000
    assert parse_rate("1gbit") == 1_000_000_000
    assert parse_rate("1.5Gbit") == 1_500_000_000
    assert parse_rate("0") == 0
    for bad in ("fast", "200mbps", "500kbit"):
        with pytest.raises(LabError):
            parse_rate(bad)
    # The bucket holds one 4 ms timer tick at the rate, never less than a 64 KiB GSO packet.
    assert burst_bytes(200_000_000) == 100_000
    assert burst_bytes(10_000_000) == 64 * 1024


def test_loss_becomes_a_numgen_drop_rule_on_arriving_packets() -> None:
    assert parse_loss("1%") == 1.0 and parse_loss("0.25") == 0.25
    with pytest.raises(LabError):
        parse_loss("101%")
    rules = loss_ruleset(0.25)
    assert "hook prerouting" in rules
    assert 'iifname != "lo" numgen random mod 10000 < 25 counter drop' in rules
