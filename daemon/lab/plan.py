"""Names and addresses of one lab: pure data, derived from the subnet number and node count.

A lab owns 198.18.<subnet>.0/24 (inside the benchmarking range 198.18.0.0/15, RFC 2544): the
controller is .1, nodes are .11 upwards, the machine itself is .254 on the bridge so the
operator's CLI and browser reach the controller. Every kernel object is named `isw<subnet>-...`
(link names fit the kernel's 15 characters), so labs with different subnets run side by side
and `lab down` finds a lab's objects by prefix alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imageswarm.daemon.lab.errors import LabError
from imageswarm.daemon.localcluster import API_PORT

FIRST_NODE = 11
MAX_NODES = 240  # .11 to .250; .254 is the machine's own address on the bridge
IFNAMSIZ = 15
#: Every lab object's name: `isw<subnet>-<what>`.
ANY_LAB = re.compile(r"^isw\d{1,3}-")


def prefix_of(subnet: int) -> str:
    return f"isw{subnet}-"


@dataclass(frozen=True)
class HostPlan:
    name: str  # controller, node1, node2, ...
    role: str  # controller | node
    ip: str
    netns: str
    #: The veth end on the machine's side (in the bridge); the host's own end is `eth0`.
    link: str


@dataclass(frozen=True)
class LabPlan:
    subnet: int
    nodes: int

    def __post_init__(self) -> None:
        if not 0 <= self.subnet <= 255:
            raise LabError(f"subnet must be 0-255 (198.18.<subnet>.0/24), got {self.subnet}")
        if not 1 <= self.nodes <= MAX_NODES:
            raise LabError(f"a lab has 1-{MAX_NODES} nodes, got {self.nodes}")

    @property
    def prefix(self) -> str:
        return prefix_of(self.subnet)

    @property
    def cidr(self) -> str:
        return f"198.18.{self.subnet}.0/24"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def gateway(self) -> str:
        """The machine's own address on the bridge."""
        return f"198.18.{self.subnet}.254"

    @property
    def hosts(self) -> list[HostPlan]:
        hosts = [self._host("controller", "controller", 1, "ctl")]
        for i in range(1, self.nodes + 1):
            hosts.append(self._host(f"node{i}", "node", FIRST_NODE + i - 1, f"node{i}"))
        return hosts

    @property
    def controller(self) -> HostPlan:
        return self.hosts[0]

    @property
    def controller_url(self) -> str:
        return f"http://{self.controller.ip}:{API_PORT}"

    def host(self, name: str) -> HostPlan:
        for h in self.hosts:
            if name in (h.name, h.netns):
                return h
        names = ", ".join(h.name for h in self.hosts)
        raise LabError(f"no host {name!r} in this lab (hosts: {names})")

    def _host(self, name: str, role: str, octet: int, short: str) -> HostPlan:
        ns = f"{self.prefix}{short}"
        assert len(ns) <= IFNAMSIZ, ns
        return HostPlan(name, role, f"198.18.{self.subnet}.{octet}", ns, ns)
