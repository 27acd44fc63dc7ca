"""The network-namespace lab: a controller host and N node hosts on one machine.

Each host is a network namespace with one veth link on a shared bridge, addresses from the
benchmarking range 198.18.0.0/15, its link shaped with tc tbf and, when asked, packets dropped
by an nftables rule; each node host also gets a mount namespace of its own with a loop-mounted
read-only ext4 root. The real daemons run inside. Every object the lab creates is named with
the prefix `isw<subnet>-` and recorded in `<workdir>/lab.json`, so `lab down` finds it with or
without that file.

Modules: `plan` (names and addresses), `shaping` (rates, tbf, nftables loss), `net` (bridge,
namespaces, links), `state` (the JSON record), `cleanup` (`lab down`), `hosts` (daemons in
the namespaces, `lab up`, `lab exec`).
"""
