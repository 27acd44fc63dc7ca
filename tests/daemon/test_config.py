"""Config files: examples are valid, and every bad file names the file, the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imageswarm.daemon import config
from imageswarm.daemon.errors import ConfigError

KEY = "ed25519:" + "A" * 43 + "="


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("role", ["controller", "node"])
def test_examples_are_valid(tmp_path: Path, role: str) -> None:
    path = tmp_path / f"{role}.yaml"
    path.write_text(config.EXAMPLES[role])
    cfg = config.load(path)
    assert cfg.role == role
    assert cfg.store_dir == cfg.cache_dir / "store"


def test_cli_prints_example_and_checks_it(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "imageswarm.daemon.cli.main", "config", "example", "--role", "node"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out == config.EXAMPLES["node"]
    path = tmp_path / "node.yaml"
    path.write_text(out)
    ok = subprocess.run(
        [sys.executable, "-m", "imageswarm.daemon.cli.main", "config", "check", str(path)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    path.write_text(out.replace("role: node", "role: nod"))
    bad = subprocess.run(
        [sys.executable, "-m", "imageswarm.daemon.cli.main", "config", "check", str(path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert str(path) in bad.stderr and "'role'" in bad.stderr


NODE = {"role": "node", "controller_url": "http://127.0.0.1:7700", "trusted_keys": [KEY]}


@pytest.mark.parametrize(
    "data,key,expected",
    [
        ({"role": "boss"}, "role", "'controller' or 'node'"),
        ({**NODE, "controller_url": None}, "controller_url", "required for role: node"),
        ({**NODE, "controller_url": "ftp://x"}, "controller_url", "http"),
        ({**NODE, "trusted_keys": []}, "trusted_keys", "at least one"),
        ({**NODE, "trusted_keys": ["rsa:abc"]}, "trusted_keys[0]", "ed25519"),
        ({**NODE, "cluster_cidrs": ["10.0.0.0/33"]}, "cluster_cidrs", "CIDRs"),
        ({**NODE, "api_listen": "localhost"}, "api_listen", "IP literal"),
        ({**NODE, "swarm": {"upload_rate_limit": -1}}, "swarm.upload_rate_limit", ">= 0"),
        ({**NODE, "swarm": {"listen": "1.2.3.4:99999"}}, "swarm.listen", "IP literal"),
        ({**NODE, "swarm": {"settings": {"x": [1]}}}, "swarm.settings", "libtorrent"),
        ({**NODE, "swarm": {"uplaod_rate_limit": 5}}, "swarm.uplaod_rate_limit", "unknown"),
        ({**NODE, "cache_dri": "/x"}, "cache_dri", "unknown"),
    ],
)
def test_bad_config_names_file_key_and_expectation(
    tmp_path: Path, data: dict[str, object], key: str, expected: str
) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert str(path) in message
    assert f"'{key}'" in message
    assert expected in message


def test_unreadable_and_non_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text("role: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(path)
    path.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        config.load(path)


def test_control_plane_keys(tmp_path: Path) -> None:
    cfg = config.load(
        _write(
            tmp_path,
            {
                **NODE,
                "join_secret": "s",
                "labels": {"role": "compute"},
                "agent": {
                    "root": "/srv/root",
                    "preserve": ["var/lib/x/"],
                    "restart_services": True,
                },
            },
        )
    )
    assert cfg.labels == {"role": "compute"}
    assert cfg.agent.root == Path("/srv/root") and cfg.agent.restart_services
    assert cfg.agent_state_dir == cfg.cache_dir / "agent"
    for bad, key in (
        ({**NODE, "labels": {"a": 1}}, "labels"),
        ({**NODE, "agent": {"preserve": "x"}}, "agent.preserve"),
        ({**NODE, "agent": {"restart_services": "yes"}}, "agent.restart_services"),
        ({**NODE, "agent": {"rot": "/"}}, "agent.rot"),
        ({**NODE, "heartbeat_interval": 0}, "heartbeat_interval"),
    ):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            config.load(_write(tmp_path, bad))
