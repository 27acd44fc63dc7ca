"""Publishing offline into a store: formats, idempotence, delta, and refusal of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from imageswarm.agent import keys
from imageswarm.agent.errors import ImageFormatError, InvalidInputError
from imageswarm.agent.store import Store
from imageswarm.daemon.publish import publish
from imageswarm.daemon.swarm.torrent import (
    TorrentFile,
    check_image_torrent,
    check_torrent,
    chunk_torrent,
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imageswarm.daemon.cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _snapshot(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def test_cli_publish_json_and_store_contents(
    tmp_path: Path, ext4_pair: tuple[Path, Path, Path]
) -> None:
    v1, _, _ = ext4_pair
    key_out = _cli("key", "generate", str(tmp_path / "build.key"))
    assert key_out.returncode == 0 and key_out.stdout.startswith("ed25519:")
    store_dir = tmp_path / "store"
    out = _cli(
        "image",
        "publish",
        str(v1),
        "--name",
        "web",
        "--store",
        str(store_dir),
        "--key",
        str(tmp_path / "build.key"),
        "--json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"image_id", "name", "size", "sha256", "chunks", "signature"} <= set(data)
    assert all({"hash", "length"} <= set(c) for c in data["chunks"])
    assert data["size"] == v1.stat().st_size
    assert data["kernels"] == ["6.1.0-demo-amd64"]
    store = Store.open(store_dir)
    public = keys.PublicKey.parse(key_out.stdout.strip())
    manifest = store.load_manifest(data["image_id"], [public])
    torrent = store.load_torrent(manifest.image_id)
    check_torrent(
        torrent, [TorrentFile(h, n, bytes.fromhex(h)) for h, n in manifest.unique_chunks().items()]
    )
    # What a node builds from the signed manifest instead of downloading it: the same bytes.
    assert chunk_torrent(manifest.unique_chunks(), manifest.name) == torrent
    assert store.assemble(manifest, tmp_path / "out.img").read_bytes() == v1.read_bytes()
    # The image torrent's file is written in the same pass, sparse where the image has holes.
    copy = store.image_path(manifest.image_id)
    assert copy.read_bytes() == v1.read_bytes()
    assert copy.stat().st_blocks * 512 < v1.stat().st_size
    image_torrent = store.load_image_torrent(manifest.image_id)
    check_image_torrent(image_torrent, manifest.image_id, manifest.size, manifest.image_info_hash)
    again = _cli(
        "image",
        "publish",
        str(v1),
        "--name",
        "web",
        "--store",
        str(store_dir),
        "--key",
        str(tmp_path / "build.key"),
    )
    assert again.returncode == 0 and "already published" in again.stderr


def test_rebuilt_image_with_one_changed_file_shares_almost_every_chunk(
    tmp_path: Path, ext4_pair: tuple[Path, Path, Path]
) -> None:
    v1, v2, _ = ext4_pair
    store = Store.open(tmp_path / "store")
    key = keys.generate(tmp_path / "k")
    first = publish(v1, "v1", store, key)
    second = publish(v2, "v2", store, key)
    ideal = 1024 * 1024
    # New bytes = the changed file plus the filesystem metadata that changed with it.
    assert second.new_bytes < 0.1 * second.manifest.size
    assert second.new_bytes <= 1.5 * ideal, second.new_bytes
    assert first.manifest.image_id != second.manifest.image_id


def test_qcow2_and_tar_sources(tmp_path: Path, ext4_pair: tuple[Path, Path, Path]) -> None:
    v1, _, tree = ext4_pair
    store = Store.open(tmp_path / "store")
    key = keys.generate(tmp_path / "k")
    qcow = tmp_path / "v1.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(v1), str(qcow)], check=True
    )
    result = publish(qcow, "q", store, key)
    assert result.manifest.source_format == "qcow2" and result.manifest.format == "raw"
    assert store.assemble(result.manifest, tmp_path / "q.img").read_bytes() == v1.read_bytes()
    tar_path = tmp_path / "root.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(tree, arcname=".")
    tar_result = publish(tar_path, "t", store, key)
    assert tar_result.manifest.format == "tar"
    assert tar_result.manifest.kernels == ("6.1.0-demo-amd64",)
    rebuilt = store.assemble(tar_result.manifest, tmp_path / "t.tar")
    assert rebuilt.read_bytes() == tar_path.read_bytes()


def test_bad_sources_leave_the_store_unchanged(
    tmp_path: Path, ext4_pair: tuple[Path, Path, Path]
) -> None:
    v1, _, _ = ext4_pair
    store = Store.open(tmp_path / "store")
    key = keys.generate(tmp_path / "k")
    publish(v1, "v1", store, key)
    before = _snapshot(store.root)
    truncated = tmp_path / "truncated.img"
    truncated.write_bytes(v1.read_bytes()[: 20 * 1024 * 1024])
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 1000)
    for bad in (truncated, text, tmp_path / "missing.img"):
        with pytest.raises((ImageFormatError, InvalidInputError)):
            publish(bad, "bad", store, key)
        assert _snapshot(store.root) == before
    with pytest.raises(InvalidInputError, match="name"):
        publish(v1, "", store, key)


def test_cli_publish_errors_are_clear(tmp_path: Path, ext4_pair: tuple[Path, Path, Path]) -> None:
    v1, _, _ = ext4_pair
    missing_key = _cli(
        "image",
        "publish",
        str(v1),
        "--name",
        "x",
        "--store",
        str(tmp_path / "s"),
        "--key",
        str(tmp_path / "nokey"),
    )
    assert missing_key.returncode == 1
    assert "key generate" in missing_key.stderr
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\x01" * 100_000)
    _cli("key", "generate", str(tmp_path / "k"))
    bad = _cli(
        "image",
        "publish",
        str(junk),
        "--name",
        "x",
        "--store",
        str(tmp_path / "s"),
        "--key",
        str(tmp_path / "k"),
    )
    assert bad.returncode == 1
    assert "not a disk or filesystem image" in bad.stderr
    assert "Traceback" not in bad.stderr
