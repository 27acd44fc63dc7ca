"""TLS on the controller's REST API, with real processes on 127.0.0.130-139.

The API (operator token, join secret, node tokens) is HTTPS only; the swarm (tracker, web seed,
signed manifests and torrents) is plain HTTP on a listener of its own, because libtorrent cannot
verify a private CA (the last test shows it refusing ours). A throwaway CA signs a certificate
for the controller's IP; nodes and the CLI trust that CA and nothing else.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from imageswarm.agent import keys
from imageswarm.daemon import config as cfgmod
from imageswarm.daemon.client import ApiClient
from imageswarm.daemon.errors import ConfigError, ControllerError
from imageswarm.daemon.tls import client_context
from tests.daemon.controlkit import SECRET, TOKEN, tiny_image

CONTROLLER, NODE, PROBE = "127.0.0.130", "127.0.0.131", "127.0.0.132"
API = f"https://{CONTROLLER}:7700"
SWARM = f"http://{CONTROLLER}:7780"
NODE_API = f"http://{NODE}:7700"
CLI = (sys.executable, "-m", "imageswarm.daemon.cli.main")
KEY = "ed25519:" + "A" * 43 + "="  # any well-formed key: these nodes never start


# --- a throwaway PKI ------------------------------------------------------------------------
def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )


def make_ca(directory: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _cert(name, key, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_cert(directory / f"{name}.pem", cert), key


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that signed nothing here
    other_key: Path  # a key that belongs to no certificate here


def make_pki(directory: Path, ip: str) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca(directory, "cluster-ca")
    other_ca, _ = make_ca(directory, "other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _cert(ip, key, "cluster-ca", ca_key)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Pki(
        ca=ca,
        cert=_write_cert(directory / "controller.pem", cert),
        key=_write_key(directory / "controller.key", key),
        other_ca=other_ca,
        other_key=_write_key(directory / "other.key", ec.generate_private_key(ec.SECP256R1())),
    )


# --- configs and processes ------------------------------------------------------------------
def controller_config(work: Path, pki: Pki, **extra: Any) -> dict[str, Any]:
    return {
        "role": "controller",
        "node_name": "tls-controller",
        "api_listen": f"{CONTROLLER}:7700",
        "swarm_http_listen": f"{CONTROLLER}:7780",
        "tls": {"cert": str(pki.cert), "key": str(pki.key)},
        "cache_dir": str(work / "controller"),
        "cluster_cidrs": ["127.0.0.0/8"],
        "api_token": TOKEN,
        "join_secret": SECRET,
        "heartbeat_interval": 1,
        "swarm": {"listen": f"{CONTROLLER}:6881", "announce_interval": 2},
        **extra,
    }


def node_config(work: Path, pki: Pki, trusted: str, **extra: Any) -> dict[str, Any]:
    return {
        "role": "node",
        "node_name": "tls-node",
        "api_listen": f"{NODE}:7700",
        "cache_dir": str(work / "node"),
        "cluster_cidrs": ["127.0.0.0/8"],
        "trusted_keys": [trusted],
        "controller_url": API,
        "controller_ca": str(pki.ca),
        "controller_swarm_url": SWARM,
        "join_secret": SECRET,
        # Far beyond the test: every byte must come from a peer the tracker named.
        "swarm": {"listen": f"{NODE}:6881", "web_seed_after": 600},
        "agent": {
            "root": str(work / "node-root"),
            "state_dir": str(work / "node-agent"),
            "reboot_command": "true",
        },
        **extra,
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGESWARM_")}
    return {**env, **extra}


def run_cli(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *argv], capture_output=True, text=True, env=clean_env(**env), timeout=60
    )


class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*CLI, "daemon", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=clean_env(),
            )

    def wait_healthy(self, url: str, ca: Path | None = None, seconds: float = 30) -> None:
        context = client_context(ca) if url.startswith("https:") else None
        deadline = time.monotonic() + seconds
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/healthz", context=context, timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass(frozen=True)
class Cluster:
    work: Path
    pki: Pki
    image_id: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A TLS controller holding one published image, and a node that trusts its CA."""
    work = tmp_path_factory.mktemp("tls")
    pki = make_pki(work / "pki", CONTROLLER)
    signing = keys.load_or_create(work / "controller" / "signing.key")
    controller = Daemon(
        write(work / "controller.yaml", controller_config(work, pki)), work / "controller.log"
    )
    daemons = [controller]
    try:
        controller.wait_healthy(API, pki.ca)
        image = tiny_image(work, seed=130)
        request = urllib.request.Request(
            f"{API}/api/v1/images?name=tls",
            data=image.read_bytes(),
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(request, context=client_context(pki.ca), timeout=60) as resp:
            image_id = json.load(resp)["manifest"]["image_id"]
        node_cfg = node_config(work, pki, str(signing.public))
        node = Daemon(write(work / "node.yaml", node_cfg), work / "node.log")
        daemons.append(node)
        node.wait_healthy(NODE_API)
        yield Cluster(work, pki, image_id)
    finally:
        for d in reversed(daemons):
            d.stop()


# --- bad TLS configuration ------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,key,expected",
    [
        ({"swarm_http_listen": None}, "swarm_http_listen", "libtorrent cannot verify"),
        ({"swarm_http_listen": f"{CONTROLLER}:7700"}, "swarm_http_listen", "other than"),
        ({"tls": {"cert": "/c.pem"}}, "tls.key", "required"),
        ({"tls": {"cert": "/c.pem", "key": "/k.pem", "ca": "/x"}}, "tls.ca", "unknown"),
        ({"controller_ca": "/ca.pem"}, "controller_ca", "role: node"),
    ],
)
def test_controller_tls_keys_are_validated(
    tmp_path: Path, change: dict[str, Any], key: str, expected: str
) -> None:
    pki = make_pki(tmp_path / "pki", CONTROLLER)
    path = write(tmp_path / "c.yaml", {**controller_config(tmp_path, pki), **change})
    with pytest.raises(ConfigError) as info:
        cfgmod.load(path)
    message = str(info.value)
    assert str(path) in message and f"'{key}'" in message and expected in message, message


@pytest.mark.parametrize(
    "change,key,expected",
    [
        ({"controller_swarm_url": None}, "controller_swarm_url", "required when"),
        ({"controller_url": f"http://{CONTROLLER}:7700"}, "controller_ca", "https://"),
        ({"controller_swarm_url": "ftp://x"}, "controller_swarm_url", "http"),
        ({"tls": {"cert": "/c", "key": "/k"}}, "tls", "role: controller"),
    ],
)
def test_node_tls_keys_are_validated(
    tmp_path: Path, change: dict[str, Any], key: str, expected: str
) -> None:
    pki = make_pki(tmp_path / "pki", CONTROLLER)
    path = write(tmp_path / "n.yaml", {**node_config(tmp_path, pki, KEY), **change})
    with pytest.raises(ConfigError) as info:
        cfgmod.load(path)
    message = str(info.value)
    assert str(path) in message and f"'{key}'" in message and expected in message, message


def test_swarm_url_follows_the_listeners(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", CONTROLLER)
    controller = cfgmod.parse(tmp_path / "c.yaml", controller_config(tmp_path, pki))
    assert controller.swarm_url == SWARM
    plain = {"tls": None, "swarm_http_listen": None}
    assert cfgmod.parse(
        tmp_path / "c.yaml", {**controller_config(tmp_path, pki), **plain}
    ).swarm_url == (f"http://{CONTROLLER}:7700")
    node = cfgmod.parse(tmp_path / "n.yaml", node_config(tmp_path, pki, KEY))
    assert (node.controller_url, node.swarm_url, node.controller_ca) == (API, SWARM, pki.ca)


@pytest.mark.parametrize(
    "files,named,expected",
    [
        ({"cert": "missing.pem"}, "missing.pem", "cannot read the certificate"),
        ({"key": "missing.key"}, "missing.key", "cannot read the private key"),
        ({"key": "other.key"}, "other.key", "does not belong to the certificate"),
        ({"cert": "other.key"}, "other.key", "is not a PEM certificate"),
        ({"key": "controller.pem"}, "controller.pem", "is not a PEM private key"),
    ],
)
def test_daemon_refuses_to_start_with_bad_tls_files(
    tmp_path: Path, files: dict[str, str], named: str, expected: str
) -> None:
    pki = make_pki(tmp_path / "pki", CONTROLLER)
    tls = {"cert": str(pki.cert), "key": str(pki.key)}
    tls.update({k: str(tmp_path / "pki" / v) for k, v in files.items()})
    path = write(tmp_path / "c.yaml", controller_config(tmp_path, pki, tls=tls))
    done = run_cli("daemon", "--config", str(path))
    assert done.returncode == 1, done.stderr
    assert f"{path}: key 'tls'" in done.stderr and named in done.stderr, done.stderr
    assert expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_node_refuses_to_start_with_an_unusable_ca(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", CONTROLLER)
    for ca, expected in ((tmp_path / "nope.pem", "cannot read"), (pki.key, "not a PEM CA")):
        path = write(tmp_path / "n.yaml", node_config(tmp_path, pki, KEY, controller_ca=str(ca)))
        done = run_cli("daemon", "--config", str(path))
        assert done.returncode == 1, done.stderr
        assert f"{path}: key 'controller_ca'" in done.stderr, done.stderr
        assert str(ca) in done.stderr and expected in done.stderr, done.stderr


# --- a TLS controller and a node, as real processes -------------------------------------------
async def test_node_heartbeats_over_https_and_fetches_over_the_swarm(cluster: Cluster) -> None:
    async with ApiClient(NODE_API) as node:
        state = await node.post_json(f"/api/v1/images/{cluster.image_id}/fetch")
        async with asyncio.timeout(90):
            while state["state"] not in ("done", "failed"):
                await asyncio.sleep(0.25)
                state = await node.get_json(f"/api/v1/images/{cluster.image_id}")
    assert state["state"] == "done", state
    # No web seed (web_seed_after: 600): the controller seeded as a peer the tracker named.
    assert state["bytes_by_source"]["controller"] > 0, state
    assert state["bytes_by_source"]["web_seed"] == 0, state
    async with ApiClient(API, ca=cluster.pki.ca, token=TOKEN) as api, asyncio.timeout(30):
        while True:
            node_view = await api.get_json("/api/v1/nodes/tls-node")
            fetch = node_view["fetches"].get(cluster.image_id, {})
            if node_view["online"] and fetch.get("state") == "done":
                break
            await asyncio.sleep(0.3)
        metrics = await api.get_bytes("/metrics")
        assert b"imageswarm_heartbeats_total" in metrics
        async with api.event_stream("/api/v1/events", since=0) as stream:
            kinds = [(await anext(stream)).kind for _ in range(2)]
    assert kinds == ["image.published", "node.enrolled"]


async def test_the_swarm_listener_serves_only_public_swarm_content(cluster: Cluster) -> None:
    base = f"/api/v1/images/{cluster.image_id}"
    async with ApiClient(SWARM) as swarm:
        manifest = json.loads(await swarm.get_bytes(f"{base}/manifest"))
        assert manifest["image_id"] == cluster.image_id
        assert await swarm.get_bytes(f"{base}/torrent")
        for method, path in (
            ("GET", "/api/v1/nodes"),
            ("GET", "/api/v1/images"),
            ("POST", "/api/v1/nodes/enroll"),
            ("POST", "/api/v1/images?name=x"),
            ("GET", "/api/v1/events"),
            ("GET", "/metrics"),
        ):
            with pytest.raises(ControllerError) as info:
                await swarm.request(method, path)
            assert info.value.status in (404, 405), (method, path, info.value)


async def test_plain_http_to_the_tls_port_fails(cluster: Cluster) -> None:
    async with ApiClient(f"http://{CONTROLLER}:7700") as api:
        with pytest.raises(ControllerError) as info:
            await api.get_json("/healthz")
    assert info.value.status == 0 and "cannot reach" in info.value.detail


def test_cli_trusts_the_given_ca_only(cluster: Cluster) -> None:
    common = ("nodes", "list", "--controller", API, "--json")
    ok = run_cli(*common, "--ca", str(cluster.pki.ca))
    assert ok.returncode == 0, ok.stderr
    assert "tls-node" in [n["name"] for n in json.loads(ok.stdout)]
    from_env = run_cli("image", "list", "--controller", API, IMAGESWARM_CA=str(cluster.pki.ca))
    assert from_env.returncode == 0 and cluster.image_id in from_env.stdout, from_env.stderr
    for extra in ((), ("--ca", str(cluster.pki.other_ca))):
        refused = run_cli(*common, *extra)
        assert refused.returncode == 1, refused.stdout
        assert "TLS certificate is not trusted" in refused.stderr, refused.stderr
        assert "--ca FILE" in refused.stderr and "Traceback" not in refused.stderr
    missing = run_cli(*common, "--ca", str(cluster.work / "missing.pem"))
    assert missing.returncode == 1 and "cannot read the CA certificate" in missing.stderr


async def test_libtorrent_uses_the_plain_web_seed_and_refuses_our_ca_over_https(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Why the swarm stays on plain HTTP: libtorrent 2.1 has no setting for a private CA."""
    async with ApiClient(SWARM) as swarm:
        torrent = await swarm.get_bytes(f"/api/v1/images/{cluster.image_id}/torrent")
    plain = await _web_seed_only(torrent, f"{SWARM}/webseed/", tmp_path / "plain")
    assert plain == "finished"
    tls = await _web_seed_only(torrent, f"{API}/webseed/", tmp_path / "tls")
    assert "certificate verify failed" in tls


async def _web_seed_only(torrent: bytes, url: str, save: Path) -> str:
    """Download `torrent` from the web seed `url` alone (no tracker, no peers): "finished", or
    the first error libtorrent reports for the seed."""
    session = lt.session(
        {
            "listen_interfaces": f"{PROBE}:0",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "alert_mask": lt.alert_category.error
            | lt.alert_category.connect
            | lt.alert_category.status,
        }
    )
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(torrent)
    params.save_path = str(save)
    params.url_seeds = [url]
    session.add_torrent(params)
    try:
        async with asyncio.timeout(60):
            while True:
                for alert in session.pop_alerts():
                    if isinstance(alert, lt.torrent_finished_alert):
                        return "finished"
                    message = alert.message()
                    if isinstance(alert, (lt.url_seed_alert, lt.peer_disconnected_alert)) and (
                        "certificate" in message
                    ):
                        return message
                await asyncio.sleep(0.1)
    finally:
        del session
