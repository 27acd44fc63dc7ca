"""The daemon's configuration: one YAML file, validated once into frozen objects.

Every error names the file, the key (dotted path) and what was expected. Unknown keys are
errors too, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from imageswarm.agent.keys import PublicKey
from imageswarm.daemon.errors import ConfigError

Role = Literal["controller", "node"]
DEFAULT_CIDRS = ("127.0.0.0/8", "198.18.0.0/15")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SwarmConfig:
    listen: HostPort = HostPort("127.0.0.1", 6881)
    upload_rate_limit: int = 0
    download_rate_limit: int = 0
    #: Seconds without progress from peers before a node also pulls from the controller's web seed.
    web_seed_after: float = 20.0
    announce_interval: int = 5
    settings: Mapping[str, int | bool | str] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentConfig:
    """How a node daemon runs `imageswarm agent` (see agent/apply.py)."""

    root: Path = Path("/")
    state_dir: Path | None = None  # default <cache_dir>/agent
    hooks: Path | None = None
    preserve: tuple[str, ...] = ()
    reboot_command: str = "systemctl reboot"
    restart_services: bool = False
    #: Let the first apply on a node whose running image was never recorded go ahead without
    #: a way back (otherwise the node must `imageswarm agent adopt` its image first).
    allow_no_rollback: bool = False


@dataclass(frozen=True)
class TlsConfig:
    """The controller's REST API certificate (PEM chain, leaf first) and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Config:
    path: Path
    role: Role
    node_name: str
    api_listen: HostPort
    cache_dir: Path
    cluster_cidrs: tuple[str, ...]
    trusted_keys: tuple[PublicKey, ...]
    swarm: SwarmConfig
    controller_url: str | None = None
    signing_key: Path | None = None
    api_token: str | None = None
    join_secret: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    heartbeat_interval: float = 10.0
    db_path: Path | None = None
    agent: AgentConfig = AgentConfig()
    #: Controller: serve the REST API over HTTPS (docs/control-plane.md, "TLS").
    tls: TlsConfig | None = None
    #: Controller: the plain-HTTP swarm listener (tracker, web seed, signed manifests/torrents).
    swarm_http_listen: HostPort | None = None
    #: Node: the CA that signed the controller's certificate (None: the system store).
    controller_ca: Path | None = None
    #: Node: the controller's swarm listener (default: controller_url).
    controller_swarm_url: str | None = None

    @property
    def swarm_url(self) -> str:
        """Where the swarm plane is served: /announce, /webseed/ and the signed image files."""
        if self.role == "controller":
            return f"http://{self.swarm_http_listen or self.api_listen}"
        assert self.controller_url is not None
        return self.controller_swarm_url or self.controller_url

    @property
    def store_dir(self) -> Path:
        return self.cache_dir / "store"

    @property
    def agent_state_dir(self) -> Path:
        return self.agent.state_dir or self.cache_dir / "agent"

    @property
    def database(self) -> Path:
        return self.db_path or self.cache_dir / "controller.db"


class _Reader:
    """Typed access to one mapping of the YAML file, with errors that name file and key."""

    def __init__(self, path: Path, data: Mapping[str, Any], prefix: str = "") -> None:
        self.path, self.data, self.prefix = path, data, prefix
        self.seen: set[str] = set()

    def fail(self, key: str, expected: str) -> ConfigError:
        got = self.data.get(key, "<missing>")
        return ConfigError(
            f"{self.path}: key '{self.prefix}{key}': expected {expected}, got {got!r}"
        )

    def get(self, key: str, default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self.fail(key, "a value (this key is required)")
            return default
        return self.data[key]

    def text(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, default)
        if value is not default and (not isinstance(value, str) or not value):
            raise self.fail(key, "a non-empty string")
        return value

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(key, f"an integer >= {minimum}")
        return value

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = self.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < minimum:
            raise self.fail(key, f"a number >= {minimum}")
        return float(value)

    def hostport(self, key: str, default: HostPort) -> HostPort:
        value = self.get(key, str(default))
        host, sep, port = str(value).rpartition(":")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
            number = int(port)
        except ValueError:
            raise self.fail(key, "an address like 127.0.0.1:7700 (IP literal and port)") from None
        if not sep or not 0 <= number <= 65535:
            raise self.fail(key, "an address like 127.0.0.1:7700 (IP literal and port)")
        return HostPort(host, number)

    def optional_hostport(self, key: str) -> HostPort | None:
        return None if self.get(key, None) is None else self.hostport(key, HostPort("", 0))

    def url(self, key: str) -> str | None:
        value = self.text(key, None)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(key, "an http:// or https:// URL")
        return str(value).rstrip("/")

    def sub(self, key: str) -> _Reader:
        value = self.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "a mapping")
        return _Reader(self.path, value, f"{self.prefix}{key}.")

    def done(self) -> None:
        extra = sorted(set(self.data) - self.seen)
        if extra:
            raise ConfigError(f"{self.path}: unknown key '{self.prefix}{extra[0]}'")


def _swarm(r: _Reader) -> SwarmConfig:
    settings = r.get("settings", {})
    if not isinstance(settings, dict) or not all(
        isinstance(k, str) and isinstance(v, int | bool | str) for k, v in settings.items()
    ):
        raise r.fail("settings", "a mapping of libtorrent setting names to int/bool/str values")
    cfg = SwarmConfig(
        listen=r.hostport("listen", SwarmConfig.listen),
        upload_rate_limit=r.integer("upload_rate_limit", 0),
        download_rate_limit=r.integer("download_rate_limit", 0),
        web_seed_after=r.number("web_seed_after", SwarmConfig.web_seed_after),
        announce_interval=r.integer("announce_interval", SwarmConfig.announce_interval, minimum=1),
        settings=dict(settings),
    )
    r.done()
    return cfg


def _tls(r: _Reader) -> TlsConfig | None:
    if r.get("tls", None) is None:
        return None
    t = r.sub("tls")
    cfg = TlsConfig(cert=Path(t.text("cert")), key=Path(t.text("key")))
    t.done()
    return cfg


def _controller_tls(r: _Reader, api_listen: HostPort) -> tuple[TlsConfig | None, HostPort | None]:
    """`tls` and `swarm_http_listen` (docs/control-plane.md, "TLS")."""
    for key in ("controller_ca", "controller_swarm_url"):
        if r.get(key, None) is not None:
            raise r.fail(key, "nothing: it is a node's key (role: node)")
    tls, listen = _tls(r), r.optional_hostport("swarm_http_listen")
    if tls is not None and listen is None:
        raise r.fail(
            "swarm_http_listen",
            "a plain-HTTP address like 198.18.0.1:7780 for the tracker and web seed "
            "(required with tls: libtorrent cannot verify a private CA)",
        )
    if listen == api_listen:
        raise r.fail("swarm_http_listen", "an address other than api_listen")
    return tls, listen


def _node_tls(r: _Reader, controller_url: str) -> tuple[Path | None, str | None]:
    """`controller_ca` and `controller_swarm_url` (docs/control-plane.md, "TLS")."""
    for key in ("tls", "swarm_http_listen"):
        if r.get(key, None) is not None:
            raise r.fail(key, "nothing: only a controller serves TLS (role: controller)")
    ca, swarm_url = r.text("controller_ca", None), r.url("controller_swarm_url")
    https = controller_url.startswith("https:")
    if ca is not None and not https:
        raise r.fail("controller_ca", "no CA file unless controller_url is https://")
    if https and swarm_url is None:
        raise r.fail(
            "controller_swarm_url",
            "the controller's plain-HTTP swarm listener, like http://198.18.0.1:7780 "
            "(required when controller_url is https://)",
        )
    return (Path(ca) if ca else None), swarm_url


def _agent(r: _Reader) -> AgentConfig:
    preserve = r.get("preserve", [])
    if not isinstance(preserve, list) or not all(isinstance(p, str) and p for p in preserve):
        raise r.fail("preserve", "a list of root-relative paths")
    restart = r.get("restart_services", False)
    if not isinstance(restart, bool):
        raise r.fail("restart_services", "true or false")
    no_rollback = r.get("allow_no_rollback", False)
    if not isinstance(no_rollback, bool):
        raise r.fail("allow_no_rollback", "true or false")
    hooks = r.text("hooks", None)
    state_dir = r.text("state_dir", None)
    cfg = AgentConfig(
        root=Path(r.text("root", "/")),
        state_dir=Path(state_dir) if state_dir else None,
        hooks=Path(hooks) if hooks else None,
        preserve=tuple(preserve),
        reboot_command=r.text("reboot_command", AgentConfig.reboot_command),
        restart_services=restart,
        allow_no_rollback=no_rollback,
    )
    r.done()
    return cfg


def parse(path: Path, data: Any) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    r = _Reader(path, data)
    role = r.text("role")
    if role not in ("controller", "node"):
        raise r.fail("role", "'controller' or 'node'")
    cidrs = r.get("cluster_cidrs", list(DEFAULT_CIDRS))
    if not isinstance(cidrs, list) or not cidrs:
        raise r.fail("cluster_cidrs", "a non-empty list of CIDRs like 198.18.0.0/15")
    for cidr in cidrs:
        try:
            ipaddress.ip_network(str(cidr), strict=False)
        except ValueError:
            raise r.fail(
                "cluster_cidrs", f"CIDRs like 198.18.0.0/15 ({cidr!r} is not one)"
            ) from None
    keys_raw = r.get("trusted_keys", [])
    if not isinstance(keys_raw, list):
        raise r.fail("trusted_keys", "a list of 'ed25519:<base64>' public keys")
    keys: list[PublicKey] = []
    for index, text in enumerate(keys_raw):
        try:
            keys.append(PublicKey.parse(str(text)))
        except ValueError as exc:
            raise ConfigError(f"{path}: key 'trusted_keys[{index}]': {exc}") from None
    cache_dir = Path(r.text("cache_dir", "/var/lib/imageswarm"))
    controller_url = r.url("controller_url")
    api_listen = r.hostport("api_listen", HostPort("127.0.0.1", 7700))
    tls, swarm_http_listen, controller_ca, controller_swarm_url = None, None, None, None
    if role == "node":
        if controller_url is None:
            raise r.fail("controller_url", "the controller's URL (required for role: node)")
        if not keys:
            raise r.fail("trusted_keys", "at least one public key (nodes refuse unsigned images)")
        controller_ca, controller_swarm_url = _node_tls(r, controller_url)
    else:
        tls, swarm_http_listen = _controller_tls(r, api_listen)
    signing_key = r.text("signing_key", None)
    labels = r.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise r.fail("labels", "a mapping of label names to string values")
    db_path = r.text("db_path", None)
    cfg = Config(
        path=path,
        role=role,
        node_name=r.text("node_name", socket.gethostname()),
        api_listen=api_listen,
        cache_dir=cache_dir,
        cluster_cidrs=tuple(str(c) for c in cidrs),
        trusted_keys=tuple(keys),
        swarm=_swarm(r.sub("swarm")),
        controller_url=controller_url,
        signing_key=(Path(signing_key) if signing_key else cache_dir / "signing.key")
        if role == "controller"
        else None,
        api_token=r.text("api_token", None),
        join_secret=r.text("join_secret", None),
        labels=dict(labels),
        heartbeat_interval=r.number("heartbeat_interval", 10.0, minimum=0.1),
        db_path=Path(db_path) if db_path else None,
        agent=_agent(r.sub("agent")),
        tls=tls,
        swarm_http_listen=swarm_http_listen,
        controller_ca=controller_ca,
        controller_swarm_url=controller_swarm_url,
    )
    r.done()
    return cfg


def load(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return parse(path, data)


EXAMPLES: dict[str, str] = {
    "controller": """\
# imageswarm controller (undercloud) configuration.
role: controller
# Name shown in events and the dashboard.
node_name: undercloud
# The REST API listens here (IP literal and port).
api_listen: 198.18.0.1:7700
# Serve the REST API over HTTPS: a PEM certificate chain (leaf first; its SAN must name the
# address nodes and operators use, e.g. IP:198.18.0.1) and its unencrypted PEM private key.
# Without tls the API is plain HTTP (lab only).
tls:
  cert: /etc/imageswarm/tls/controller.pem
  key: /etc/imageswarm/tls/controller.key
# Plain HTTP for the swarm only: the tracker, the web seed and the signed manifests and
# torrents (public; their integrity comes from the signature). Required with tls, because
# libtorrent cannot verify a private CA; without it they are served on api_listen.
swarm_http_listen: 198.18.0.1:7780
# Chunk store, signing key and state live under this directory.
cache_dir: /var/lib/imageswarm
# Only peers inside these networks may join the swarm (libtorrent ip_filter).
cluster_cidrs: [198.18.0.0/15]
# Ed25519 key that signs manifests; created (mode 0600) on first start.
signing_key: /var/lib/imageswarm/signing.key
# Extra keys whose images this controller also accepts (e.g. a build host's).
trusted_keys: []
# Bearer token operators must send to mutating endpoints. Unset: no auth (lab only).
api_token: change-me
# Nodes enroll with this shared secret and then use their own per-node token.
join_secret: change-me-too
# Seconds between node heartbeats (told to every node in each answer).
heartbeat_interval: 10
swarm:
  # libtorrent listens here for peers.
  listen: 198.18.0.1:6881
  # Bytes per second; 0 = unlimited. Applies to LAN peers too.
  upload_rate_limit: 0
  download_rate_limit: 0
  # Tracker announce interval in seconds (short: a rollout's swarm changes fast).
  announce_interval: 5
  # Raw libtorrent settings_pack overrides, for tuning.
  settings: {}
""",
    "node": """\
# imageswarm node configuration.
role: node
# This node's name as the controller knows it.
node_name: compute-0
# Local API (image fetch, status) listens here.
api_listen: 127.0.0.1:7701
# Chunk store and agent state live under this directory.
cache_dir: /var/lib/imageswarm
# The controller's REST API (enrollment, heartbeats); https is verified, never skipped.
controller_url: https://198.18.0.1:7700
# The CA certificate (PEM) that signed the controller's; without it, the system's CA store.
controller_ca: /etc/imageswarm/tls/ca.pem
# The controller's swarm_http_listen: tracker, web seed, signed manifests and torrents
# (default: controller_url; required with https, as libtorrent cannot verify a private CA).
controller_swarm_url: http://198.18.0.1:7780
# Only peers inside these networks may join the swarm.
cluster_cidrs: [198.18.0.0/15]
# Public keys whose signed images this node accepts (`imageswarm key generate` prints one).
trusted_keys:
  - ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
# The controller's join_secret, used once to enroll and get this node's own token.
join_secret: change-me-too
# Labels rollouts can select nodes by.
labels:
  role: compute
# How this node applies images (imageswarm agent).
agent:
  root: /
  # Executables in pre-configure.d, configure.d, post-configure.d, error.d.
  hooks: /etc/imageswarm/hooks
  # Extra root-relative paths to keep (a trailing / keeps a whole tree).
  preserve: [var/lib/myservice/]
  reboot_command: systemctl reboot
  restart_services: true
swarm:
  # libtorrent listens here; peers must reach this address.
  listen: 198.18.0.2:6881
  upload_rate_limit: 0
  download_rate_limit: 0
  # Seconds without progress from peers before also using the controller's web seed.
  web_seed_after: 20
  settings: {}
""",
}
