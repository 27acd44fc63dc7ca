"""The chunk store: dedup, verified reads, sparse verified assembly, pins and GC."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from imageswarm.agent import keys
from imageswarm.agent import manifest as mf
from imageswarm.agent.chunkhash import chunk_name
from imageswarm.agent.errors import ChunkCorruptError, ChunkMissingError, StoreError
from imageswarm.agent.store import Store


def _image(
    store: Store, key: keys.SigningKey, parts: list[bytes | int], image_id: str
) -> mf.Manifest:
    """Store `parts` (bytes = chunk, int = hole of that many zero bytes) as one image."""
    entries = []
    whole = hashlib.sha256()
    with store.writer() as writer:
        for part in parts:
            if isinstance(part, int):
                entries.append(mf.ChunkEntry(None, part))
                whole.update(bytes(part))
            else:
                writer.add(chunk_name(part), part)
                entries.append(mf.ChunkEntry(chunk_name(part), len(part)))
                whole.update(part)
    manifest = mf.Manifest(
        image_id=image_id,
        name=image_id,
        created="2026-11-29T00:00:00Z",
        source_format="raw",
        format="raw",
        size=sum(e.length for e in entries),
        sha256=whole.hexdigest(),
        chunks=tuple(entries),
        kernels=(),
        info_hash="00" * 32,
        image_info_hash="01" * 32,
    ).signed(key)
    store.save_image(manifest, b"torrent", b"image torrent")
    return manifest


@pytest.fixture
def key(tmp_path: Path) -> keys.SigningKey:
    return keys.generate(tmp_path / "k.pem")


def test_assemble_rebuilds_sparse_verified_image(tmp_path: Path, key: keys.SigningKey) -> None:
    store = Store.open(tmp_path / "store")
    a, b = os.urandom(70_000), os.urandom(1234)
    manifest = _image(store, key, [a, 8 << 20, b, a], "img1")
    path = store.assemble(manifest)
    data = path.read_bytes()
    assert data == a + bytes(8 << 20) + b + a
    assert path.stat().st_blocks * 512 < 1 << 20  # the hole stayed a hole
    assert store.refcounts() == {chunk_name(a): 1, chunk_name(b): 1}


def test_duplicate_chunks_are_stored_once(tmp_path: Path, key: keys.SigningKey) -> None:
    store = Store.open(tmp_path / "store")
    a = os.urandom(5000)
    with store.writer() as w:
        assert w.add(chunk_name(a), a)
        assert not w.add(chunk_name(a), a)
    with store.writer() as w:
        assert not w.add(chunk_name(a), a)
    assert len(list((tmp_path / "store" / "chunks").rglob("*"))) == 2  # one dir, one file


def test_corrupt_or_missing_chunk_fails_assembly_and_leaves_nothing(
    tmp_path: Path, key: keys.SigningKey
) -> None:
    store = Store.open(tmp_path / "store")
    a, b = os.urandom(20_000), os.urandom(30_000)
    manifest = _image(store, key, [a, b], "img1")
    path = store.chunk_path(chunk_name(b))
    path.write_bytes(b"x" + path.read_bytes()[1:])
    with pytest.raises(ChunkCorruptError, match="corrupt"):
        store.assemble(manifest)
    assert store.bad_chunks(manifest) == [chunk_name(b)]
    path.unlink()
    with pytest.raises(ChunkMissingError):
        store.assemble(manifest)
    assert not store.image_path("img1").exists()
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_aborted_writer_leaves_store_as_it_was(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    kept = os.urandom(1000)
    with store.writer() as w:
        w.add(chunk_name(kept), kept)
    before = sorted(p.name for p in (tmp_path / "store").rglob("*"))
    writer = store.writer()
    for _ in range(3):
        data = os.urandom(1000)
        writer.add(chunk_name(data), data)
    writer.commit()
    extra = os.urandom(10)
    writer.add(chunk_name(extra), extra)
    writer.abort()
    assert sorted(p.name for p in (tmp_path / "store").rglob("*")) == before


def test_gc_keeps_current_and_previous(tmp_path: Path, key: keys.SigningKey) -> None:
    store = Store.open(tmp_path / "store")
    shared = os.urandom(4000)
    images = [_image(store, key, [shared, os.urandom(3000)], f"img{i}") for i in range(4)]
    store.set_current("img1")
    store.set_current("img2")
    assert store.pins() == {"current": "img2", "previous": "img1"}
    with pytest.raises(StoreError, match="pinned"):
        store.remove_image("img2")
    report = store.gc()
    assert sorted(report.images_removed) == ["img0", "img3"]
    assert report.chunks_removed == 2
    assert store.image_ids() == ["img1", "img2"]
    for manifest in images[1:3]:
        assert store.bad_chunks(manifest) == []
    with pytest.raises(StoreError, match="not in the store"):
        store.set_current("img0")


def test_load_manifest_checks_signature(tmp_path: Path, key: keys.SigningKey) -> None:
    store = Store.open(tmp_path / "store")
    _image(store, key, [os.urandom(100)], "img1")
    other = keys.generate(tmp_path / "other.pem")
    assert store.load_manifest("img1", [key.public]).image_id == "img1"
    with pytest.raises(StoreError):
        store.load_manifest("nope")
    from imageswarm.agent.errors import SignatureError

    with pytest.raises(SignatureError):
        store.load_manifest("img1", [other.public])


def test_a_downloaded_image_is_completed_then_cut_into_only_missing_chunks(
    tmp_path: Path, key: keys.SigningKey
) -> None:
    """A whole image downloaded by its image torrent (proven piece by piece by the fetch) is
    brought to its size (trailing holes may never have been written; bytes past the end are
    not the image's); then the chunks the store lacks are cut from it, checked if asked."""
    source = Store.open(tmp_path / "source")
    a, b, c = os.urandom(70_000), os.urandom(1234), os.urandom(5000)
    manifest = _image(source, key, [a, 1 << 20, b, c, a, 300_000], "img1")
    image = source.assemble(manifest, tmp_path / "whole.img").read_bytes()
    node = Store.open(tmp_path / "node")
    with node.writer() as writer:
        writer.add(chunk_name(b), b)  # held from an earlier image
    download = node.partial_dir / "img1.img"
    download.write_bytes(image[: len(image) - 300_000])  # the trailing hole was never written
    longer = node.partial_dir / "long.img"
    longer.write_bytes(image + b"x")
    node.complete_image(manifest, longer)
    assert longer.read_bytes() == image
    node.complete_image(manifest, download)
    assert download.read_bytes() == image
    placed = node.place_image("img1", download)
    assert placed == node.image_path("img1") and not download.exists()
    assert node.missing(manifest) == {chunk_name(a): len(a), chunk_name(c): len(c)}
    spoiled = bytearray(placed.read_bytes())
    spoiled[len(a) + (1 << 20) + 3] ^= 1  # inside chunk b, which the store already holds
    spoiled[len(a) + (1 << 20) + len(b) + 7] ^= 1  # inside chunk c, which it lacks
    bad = node.partial_dir / "spoiled.img"
    bad.write_bytes(bytes(spoiled))
    with pytest.raises(ChunkCorruptError, match=chunk_name(c)):
        node.take_chunks(manifest, bad, verify=True)
    assert node.missing(manifest) == {chunk_name(a): len(a), chunk_name(c): len(c)}  # nothing
    assert node.take_chunks(manifest, placed, verify=True) == 2
    assert node.missing(manifest) == {}
    assert node.read_chunk(chunk_name(c), len(c)) == c
    assert node.take_chunks(manifest, placed) == 0
