"""Link rates and packet loss: tc tbf on each host's link, nftables drop rules in its namespace.

This kernel has no netem, so there is no delay and no qdisc-level loss. Rate: a tbf qdisc on
both ends of each host's veth (the host's `eth0` shapes what it sends, the bridge-side end
what it receives), like a full-duplex NIC. Loss: one nftables rule in the host's own namespace,
`numgen random mod 10000 < P*100 drop`, on *incoming* packets (prerouting), so a lost packet
is lost on the wire: dropping on output instead returns an error to the sender's TCP stack,
which then knows about the loss at once and never waits for a retransmit timeout.
"""

from __future__ import annotations

import re

from imageswarm.daemon.lab.errors import LabError

#: tbf's latency: how long a packet may wait in the queue before tbf drops it. The queue then
#: holds rate x latency bytes: enough for TCP to keep the link busy, short enough that the lab
#: does not add a bufferbloat delay no real datacenter link has.
LATENCY_MS = 25
#: tbf's bucket must hold at least what the link sends in one timer tick (HZ=250 here: 4 ms),
#: or the shaper undershoots its rate; never less than one full-size GSO packet (64 KiB).
TICK_S = 0.004
MIN_BURST = 64 * 1024
MIN_RATE = 10**6
LOSS_TABLE = "isw_loss"

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)?\s*$", re.IGNORECASE)
_LOSS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%?\s*$")


def parse_rate(text: str) -> int:
    """Bits per second from tc's notation (`200mbit`, `1gbit`, `500kbit`); 0 = unshaped."""
    match = _RATE.match(text)
    if not match:
        raise LabError(f"rate {text!r}: expected a number with bit, kbit, mbit or gbit")
    bits = float(match[1]) * _UNITS[(match[2] or "bit").lower()]
    if bits and bits < MIN_RATE:
        raise LabError(f"rate {text!r}: at least 1mbit (or 0 for unshaped links)")
    return int(bits)


def format_rate(bits: int) -> str:
    """How a link is shaped, for people: `200mbit each way` or `unshaped`."""
    if not bits:
        return "unshaped"
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit} each way"
    return f"{bits}bit each way"


def parse_loss(text: str) -> float:
    """Percent of packets dropped (`1%`, `0.5`), to two decimals."""
    match = _LOSS.match(text)
    if not match or not 0 <= float(match[1]) <= 100:
        raise LabError(f"loss {text!r}: expected a percentage from 0% to 100%")
    return round(float(match[1]), 2)


def burst_bytes(bits: int) -> int:
    return max(MIN_BURST, int(bits / 8 * TICK_S))


def tbf_argv(dev: str, bits: int, netns: str | None = None) -> list[str]:
    """Replace `dev`'s root qdisc with a tbf at `bits` per second."""
    where = ["-n", netns] if netns else []
    return [
        "tc",
        *where,
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        f"{bits}bit",
        "burst",
        str(burst_bytes(bits)),
        "latency",
        f"{LATENCY_MS}ms",
    ]


def loss_ruleset(percent: float) -> str:
    """An nftables ruleset (for `nft -f -` inside a host's namespace) that drops `percent` of
    the packets arriving from the network (loopback traffic is left alone)."""
    threshold = round(percent * 100)
    return (
        f"table inet {LOSS_TABLE} {{\n"
        "  chain prerouting {\n"
        "    type filter hook prerouting priority raw; policy accept;\n"
        f'    iifname != "lo" numgen random mod 10000 < {threshold} counter drop\n'
        "  }\n"
        "}\n"
    )
