"""How the swarm's libtorrent session is configured, and checked before it is trusted.

``SwarmSettings`` is validated when it is built, before any session exists; ``settings_pack``
turns it into libtorrent's settings, with the privacy and addressing rules of a private
datacenter swarm fixed here and never taken from the operator's ``extra``. ``new_session``
builds a session from them and verifies libtorrent took every value, because the binding drops
some wrong ones silently.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, cast

import libtorrent as lt

from imageswarm.agent.errors import InvalidInputError

SettingValue = int | bool | str

# Settings the privacy and addressing rules of the swarm depend on: never taken from ``extra``.
_RESERVED: Final = frozenset(
    {
        "alert_mask",
        "dht_bootstrap_nodes",
        "enable_dht",
        "enable_lsd",
        "enable_natpmp",
        "enable_upnp",
        "listen_interfaces",
        "outgoing_interfaces",
    }
)

_ALERT_MASK: Final = (
    lt.alert.category_t.status_notification
    | lt.alert.category_t.error_notification
    | lt.alert.category_t.storage_notification
    | lt.alert.category_t.peer_notification
    | lt.alert.category_t.tracker_notification
    | lt.alert.category_t.performance_warning
    | lt.alert.category_t.ip_block_notification
)


@dataclass(frozen=True)
class SwarmSettings:
    """Everything the session is built from; tuned for a private swarm inside a datacenter."""

    listen_host: str
    listen_port: int
    allowed_cidrs: tuple[str, ...]
    upload_rate_limit: int = 0  # bytes/s, 0 = unlimited; applies to loopback and LAN peers too
    download_rate_limit: int = 0
    enable_utp: bool = False  # uTP cost 2-3x the CPU per byte of TCP in our measurements
    whole_pieces_threshold: int = 0
    max_allowed_in_request_queue: int = 32
    file_pool_size: int = 4096  # one file per chunk: keep many open
    connections_limit: int = 2000
    active_torrents_limit: int = 10000
    min_announce_interval: int = 5
    stop_tracker_timeout: int = 1  # bounds close(): the "stopped" announce waits this long
    alert_queue_size: int = 10000
    peer_stats_interval: float = 1.0  # seconds between per-peer byte counter refreshes
    extra: Mapping[str, SettingValue] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.listen_host)
        except ValueError:
            raise InvalidInputError(
                f"The swarm listen address {self.listen_host!r} is not an IP address."
            ) from None
        if not 0 <= self.listen_port <= 65535:
            raise InvalidInputError(f"The swarm listen port {self.listen_port} is not 0..65535.")
        if not self.allowed_cidrs:
            raise InvalidInputError("The swarm needs at least one allowed peer CIDR.")
        for cidr in self.allowed_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise InvalidInputError(f"The allowed peer CIDR {cidr!r} is not valid.") from None
        if self.upload_rate_limit < 0 or self.download_rate_limit < 0:
            raise InvalidInputError("Swarm rate limits must be 0 (unlimited) or positive.")
        if self.peer_stats_interval <= 0:
            raise InvalidInputError("The swarm peer statistics interval must be positive.")
        reserved = sorted(_RESERVED & self.extra.keys())
        if reserved:
            raise InvalidInputError(
                f"The swarm setting {reserved[0]!r} is fixed by imageswarm and cannot be changed."
            )
        object.__setattr__(self, "allowed_cidrs", tuple(self.allowed_cidrs))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))


def settings_pack(settings: SwarmSettings) -> dict[str, SettingValue]:
    """Return the libtorrent settings_pack (as a dict) a session is created with."""
    host = settings.listen_host
    listen = f"[{host}]" if ":" in host else host
    active = settings.active_torrents_limit
    pack: dict[str, SettingValue] = {
        # Private swarm: no discovery or port mapping that could leave the cluster.
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "dht_bootstrap_nodes": "",
        "anonymous_mode": False,
        "user_agent": "imageswarm/0.1",
        # Listen, announce and connect from the node's own address (several nodes may share a
        # host on 127.0.0.x in tests and labs).
        "listen_interfaces": f"{listen}:{settings.listen_port}",
        "outgoing_interfaces": host,
        "alert_mask": _ALERT_MASK,
        "alert_queue_size": settings.alert_queue_size,
        "upload_rate_limit": settings.upload_rate_limit,
        "download_rate_limit": settings.download_rate_limit,
        "enable_outgoing_utp": settings.enable_utp,
        "enable_incoming_utp": settings.enable_utp,
        "enable_outgoing_tcp": True,
        "enable_incoming_tcp": True,
        # Measured on a 16-node swarm: 3.1x -> 1.7x the theoretical bound, seeder upload from
        # 2-3 copies down to 1.1-1.5.
        "whole_pieces_threshold": settings.whole_pieces_threshold,
        "max_allowed_in_request_queue": settings.max_allowed_in_request_queue,
        "suggest_mode": int(lt.suggest_mode_t.no_piece_suggestions),
        "file_pool_size": settings.file_pool_size,
        "connections_limit": settings.connections_limit,
        "active_downloads": active,
        "active_seeds": active,
        "active_limit": active,
        "announce_to_all_trackers": True,
        "announce_to_all_tiers": True,
        "min_announce_interval": settings.min_announce_interval,
        "stop_tracker_timeout": settings.stop_tracker_timeout,
        # Keep connections to other seeds once a download finishes: libtorrent forgets a
        # connection's byte count when it closes, and closing them at the finish lost the last
        # second of every download's bytes-by-source (all of a small delta's). In a datacenter
        # an idle connection costs nothing.
        "close_redundant_connections": False,
    }
    pack.update(settings.extra)
    return pack


def new_session(settings: SwarmSettings) -> lt.session:
    """Build a libtorrent session from ``settings``, refusing any value libtorrent did not take."""
    pack = settings_pack(settings)
    defaults = cast(dict[str, SettingValue], lt.default_settings())
    for name, value in settings.extra.items():
        default = defaults.get(name)
        if default is not None and type(value) is not type(default):
            raise InvalidInputError(
                f"The libtorrent setting {name!r} takes a value of type "
                f"{type(default).__name__}, not {value!r}."
            )
    try:
        # flags=0: no default plugins, so no ut_pex (and no ut_metadata: we always have the
        # torrent); smart_ban is added back to ban peers that send corrupt blocks.
        session = lt.session(cast("lt.settings_pack", pack), 0)
    except KeyError as err:  # the binding's message names the setting
        raise InvalidInputError(f"libtorrent refused the settings: {err.args[0]}.") from None
    except TypeError as err:
        raise InvalidInputError(f"libtorrent refused the settings: {err}.") from None
    session.add_extension("smart_ban")
    # The filters below are set just after the session starts listening; until a torrent is
    # added, a peer that slips in can only be refused for an unknown info-hash.
    applied = cast(dict[str, SettingValue], session.get_settings())
    for name, value in pack.items():
        if applied.get(name) != value:  # the binding silently drops values of the wrong type
            raise InvalidInputError(f"libtorrent did not accept {value!r} for setting {name!r}.")
    session.set_ip_filter(_allow_only(settings.allowed_cidrs))
    # By default libtorrent puts LAN and loopback peers in a "local" peer class without rate
    # limits; put every address in the global class so the limits hold for all peers.
    session.set_peer_class_filter(_every_address(1 << lt.session.global_peer_class_id))
    return session


def _allow_only(cidrs: Sequence[str]) -> lt.ip_filter:
    """Return an ip_filter that blocks every address except those in ``cidrs``."""
    blocked, allowed = 1, 0
    f = _every_address(blocked)
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        f.add_rule(str(net.network_address), str(net.broadcast_address), allowed)
    return f


def _every_address(value: int) -> lt.ip_filter:
    """Return an ip_filter that maps every IPv4 and IPv6 address to ``value``."""
    f = lt.ip_filter()
    f.add_rule("0.0.0.0", "255.255.255.255", value)
    f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", value)
    return f
