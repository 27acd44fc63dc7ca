"""The REST boundary of both roles, in-process with real libtorrent sessions and real HTTP.

Every refusal is a problem document that names what is wrong and leaves state as it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imageswarm.agent import keys
from imageswarm.agent import manifest as mf
from imageswarm.daemon import config as cfgmod
from imageswarm.daemon import fetch as fetchmod
from imageswarm.daemon.app import create_app
from imageswarm.daemon.appkeys import STORE
from imageswarm.daemon.swarm.session import Download
from imageswarm.daemon.swarm.torrent import PIECE_LENGTH

TOKEN = "s3cret"
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
ServerFactory = Callable[..., Awaitable[TestServer]]


def _config(tmp: Path, role: str, ip: str, **extra: Any) -> cfgmod.Config:
    data: dict[str, Any] = {
        "role": role,
        "node_name": f"{role}-{ip}",
        "api_listen": f"{ip}:7700",
        "cache_dir": str(tmp / f"{role}-{ip}"),
        "cluster_cidrs": ["127.0.0.0/8"],
        "api_token": TOKEN,
        "swarm": {"listen": f"{ip}:0", "web_seed_after": 30},
        **extra,
    }
    return cfgmod.parse(tmp / f"{role}-{ip}.yaml", data)


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
async def controller(tmp_path: Path, aiohttp_server: ServerFactory) -> TestServer:
    cfg = _config(tmp_path, "controller", "127.0.0.60")
    return await aiohttp_server(create_app(cfg), host="127.0.0.60", port=7700)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def _problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = json.loads(await resp.text())
    assert body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in body["detail"]
    return body


async def test_publish_requires_token_body_and_name(
    controller: TestServer, aiohttp_client: ClientFactory, ext4_pair: tuple[Path, Path, Path]
) -> None:
    client = await aiohttp_client(controller)
    store = controller.app[STORE].root
    before = _snapshot(store)
    await _problem(await client.post("/api/v1/images?name=x", data=b"abc"), 401)
    bad = {"Authorization": "Bearer wrong"}
    await _problem(await client.post("/api/v1/images?name=x", data=b"abc", headers=bad), 401)
    body = await _problem(await client.post("/api/v1/images", data=b"abc", headers=_auth()), 400)
    assert "name" in body["detail"]
    body = await _problem(await client.post("/api/v1/images?name=x", headers=_auth()), 400)
    assert "empty" in body["detail"]
    junk = b"\x01" * 200_000
    body = await _problem(
        await client.post("/api/v1/images?name=x", data=io.BytesIO(junk), headers=_auth()), 400
    )
    assert "not a disk or filesystem image" in body["detail"]
    v1, _, _ = ext4_pair
    half = v1.read_bytes()[: 16 * 1024 * 1024]
    body = await _problem(
        await client.post("/api/v1/images?name=x", data=io.BytesIO(half), headers=_auth()), 400
    )
    assert "truncated" in body["detail"].lower() or "smaller" in body["detail"].lower()
    assert _snapshot(store) == before


async def test_publish_list_show_manifest_torrent_and_webseed(
    controller: TestServer, aiohttp_client: ClientFactory, ext4_pair: tuple[Path, Path, Path]
) -> None:
    client = await aiohttp_client(controller)
    v1, _, _ = ext4_pair
    resp = await client.post(
        "/api/v1/images?name=web", data=io.BytesIO(v1.read_bytes()), headers=_auth()
    )
    assert resp.status == 201, await resp.text()
    manifest = (await resp.json())["manifest"]
    again = await client.post(
        "/api/v1/images?name=web", data=io.BytesIO(v1.read_bytes()), headers=_auth()
    )
    assert again.status == 200 and (await again.json())["existed"] is True
    listed = (await (await client.get("/api/v1/images")).json())["images"]
    assert [i["image_id"] for i in listed] == [manifest["image_id"]]
    assert "chunks" not in listed[0] and listed[0]["unique_chunks"] > 100
    raw = await (await client.get(f"/api/v1/images/{manifest['image_id']}/manifest")).read()
    assert json.loads(raw) == manifest
    torrent = await client.get(f"/api/v1/images/{manifest['image_id']}/torrent")
    assert torrent.content_type == "application/x-bittorrent"
    await _problem(await client.get("/api/v1/images/0000000000000000"), 404)
    await _problem(await client.get("/api/v1/images/bad%20id"), 400)
    chunk = next(c for c in manifest["chunks"] if c["hash"] and c["length"] > 100)
    name = chunk["hash"]
    part = await client.get(f"/webseed/chunks/{name[:2]}/{name}", headers={"Range": "bytes=10-19"})
    assert part.status == 206 and len(await part.read()) == 10
    await _problem(await client.get(f"/webseed/chunks/{name[:2]}/{'0' * 64}"), 404)
    await _problem(await client.get("/webseed/chunks/ab/../../signing.key"), 404)


async def test_tracker_refuses_unknown_torrents(
    controller: TestServer, aiohttp_client: ClientFactory
) -> None:
    client = await aiohttp_client(controller)
    resp = await client.get(
        "/announce?info_hash=%00%01%02%03%04%05%06%07%08%09%0a%0b%0c%0d%0e%0f%10%11%12%13&port=1"
    )
    assert b"unknown torrent" in await resp.read()


@pytest.fixture
async def node_factory(
    tmp_path: Path, aiohttp_client: ClientFactory
) -> AsyncIterator[Callable[..., Awaitable[TestClient[Any, Any]]]]:
    async def make(ip: str, trusted: list[str], controller_url: str) -> TestClient[Any, Any]:
        cfg = _config(tmp_path, "node", ip, controller_url=controller_url, trusted_keys=trusted)
        return await aiohttp_client(create_app(cfg))

    yield make


async def _publish(ctl: TestClient[Any, Any], image: Path, name: str) -> dict[str, Any]:
    """Publish `image` on the controller under `name`; its manifest."""
    data = io.BytesIO(await asyncio.to_thread(image.read_bytes))
    resp = await ctl.post(f"/api/v1/images?name={name}", data=data, headers=_auth())
    assert resp.status == 201, await resp.text()
    manifest: dict[str, Any] = (await resp.json())["manifest"]
    return manifest


def _controller_key(tmp_path: Path) -> str:
    return str(keys.load(tmp_path / "controller-127.0.0.60" / "signing.key").public)


async def _wait(client: TestClient[Any, Any], image_id: str) -> dict[str, Any]:
    async with asyncio.timeout(60):
        while True:
            state: dict[str, Any] = await (await client.get(f"/api/v1/images/{image_id}")).json()
            if state["state"] in ("done", "failed"):
                return state
            await asyncio.sleep(0.2)


async def test_node_fetches_verifies_and_answers_idempotently(
    tmp_path: Path,
    controller: TestServer,
    aiohttp_client: ClientFactory,
    node_factory: Callable[..., Awaitable[TestClient[Any, Any]]],
    ext4_pair: tuple[Path, Path, Path],
) -> None:
    ctl = await aiohttp_client(controller)
    v1, _, _ = ext4_pair
    manifest = await _publish(ctl, v1, "v1")
    node = await node_factory("127.0.0.61", [_controller_key(tmp_path)], "http://127.0.0.60:7700")
    await _problem(await node.post(f"/api/v1/images/{manifest['image_id']}/fetch"), 401)
    first = await node.post(f"/api/v1/images/{manifest['image_id']}/fetch", headers=_auth())
    assert first.status == 202
    second = await node.post(f"/api/v1/images/{manifest['image_id']}/fetch", headers=_auth())
    assert (await second.json())["state"] != "failed"
    state = await _wait(node, manifest["image_id"])
    assert state["state"] == "done", state
    assert state["bytes_by_source"]["controller"] > 0
    third = await node.post(f"/api/v1/images/{manifest['image_id']}/fetch", headers=_auth())
    assert (await third.json())["state"] == "done"
    await _problem(await node.get("/api/v1/images/ffffffffffffffff"), 404)


def _flip_first_data_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        data = f.read(PIECE_LENGTH)
        at = next(i for i, b in enumerate(data) if b)
        f.seek(at)
        f.write(bytes([data[at] ^ 0xFF]))


async def test_a_whole_image_piece_spoiled_on_disk_is_found_and_fetched_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    controller: TestServer,
    aiohttp_client: ClientFactory,
    node_factory: Callable[..., Awaitable[TestClient[Any, Any]]],
    ext4_pair: tuple[Path, Path, Path],
) -> None:
    """libtorrent says it has every piece, but one differs on disk when the fetch proves the
    file against the signed image torrent: libtorrent checks the file again, fetches the
    piece again, and the image ends exactly the published one."""
    ctl = await aiohttp_client(controller)
    v1, _, _ = ext4_pair
    manifest = await _publish(ctl, v1, "v1")
    monkeypatch.setattr(fetchmod, "_PROVE_EVERY", 3600.0)  # nothing proven before the end
    spoiled: list[Path] = []
    flush = Download.flush

    async def flush_then_spoil(self: Download) -> None:
        await flush(self)
        partial = tmp_path / "node-127.0.0.66" / "store" / "partial"
        files = list(partial.glob("*.img"))
        if files and not spoiled:  # once
            await asyncio.to_thread(_flip_first_data_byte, files[0])
            spoiled.append(files[0])

    monkeypatch.setattr(Download, "flush", flush_then_spoil)
    node = await node_factory("127.0.0.66", [_controller_key(tmp_path)], "http://127.0.0.60:7700")
    await node.post(f"/api/v1/images/{manifest['image_id']}/fetch", headers=_auth())
    state = await _wait(node, manifest["image_id"])
    assert (state["state"], state["torrent"]) == ("done", "image"), state
    assert spoiled
    image = tmp_path / "node-127.0.0.66" / "store" / "images" / f"{manifest['image_id']}.img"
    assert image.read_bytes() == v1.read_bytes()


async def test_node_refuses_unknown_images_and_untrusted_keys(
    tmp_path: Path,
    controller: TestServer,
    aiohttp_client: ClientFactory,
    node_factory: Callable[..., Awaitable[TestClient[Any, Any]]],
    ext4_pair: tuple[Path, Path, Path],
) -> None:
    ctl = await aiohttp_client(controller)
    v1, _, _ = ext4_pair
    manifest = await _publish(ctl, v1, "v1")
    stranger = keys.generate(tmp_path / "stranger.key")
    node = await node_factory("127.0.0.62", [str(stranger.public)], "http://127.0.0.60:7700")
    store = tmp_path / "node-127.0.0.62" / "store"
    before = _snapshot(store)
    await node.post("/api/v1/images/0123456789abcdef/fetch", headers=_auth())
    state = await _wait(node, "0123456789abcdef")
    assert state["state"] == "failed" and "no image" in state["error"]
    await node.post(f"/api/v1/images/{manifest['image_id']}/fetch", headers=_auth())
    state = await _wait(node, manifest["image_id"])
    assert state["state"] == "failed" and "unknown key" in state["error"]
    assert _snapshot(store) == before


async def _fetch_from_forger(
    tmp_path: Path,
    ctl: TestClient[Any, Any],
    aiohttp_server: ServerFactory,
    node_factory: Callable[..., Awaitable[TestClient[Any, Any]]],
    image_id: str,
    manifest: bytes,
    kinds: str,
) -> dict[str, Any]:
    """A controller at 127.0.0.63 that serves `manifest` and, untouched, the real controller's
    torrents of the `kinds` (a route pattern); a node at 127.0.0.64 that trusts the real
    controller's key fetches `image_id` from it. Returns the fetch's final state, once it is
    checked that the node's store is as it was."""

    async def manifest_handler(request: web.Request) -> web.Response:
        return web.Response(body=manifest, content_type="application/json")

    async def torrent_handler(request: web.Request) -> web.Response:
        resp = await ctl.get(f"/api/v1/images/{image_id}/{request.match_info['kind']}")
        return web.Response(body=await resp.read())

    forger = web.Application()
    forger.router.add_get("/api/v1/images/{id}/manifest", manifest_handler)
    forger.router.add_get(f"/api/v1/images/{{id}}/{{kind:{kinds}}}", torrent_handler)
    await aiohttp_server(forger, host="127.0.0.63", port=7700)
    node = await node_factory("127.0.0.64", [_controller_key(tmp_path)], "http://127.0.0.63:7700")
    store = tmp_path / "node-127.0.0.64" / "store"
    before = _snapshot(store)
    await node.post(f"/api/v1/images/{image_id}/fetch", headers=_auth())
    state = await _wait(node, image_id)
    assert _snapshot(store) == before
    return state


async def test_node_refuses_a_tampered_manifest(
    tmp_path: Path,
    controller: TestServer,
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
    node_factory: Callable[..., Awaitable[TestClient[Any, Any]]],
    ext4_pair: tuple[Path, Path, Path],
) -> None:
    """A man in the middle changes one chunk's hash in the manifest: the signature fails."""
    ctl = await aiohttp_client(controller)
    v1, _, _ = ext4_pair
    manifest = await _publish(ctl, v1, "v1")
    tampered = dict(manifest)
    tampered["chunks"] = [dict(c) for c in manifest["chunks"]]
    first = next(c for c in tampered["chunks"] if c["hash"])
    first["hash"] = "f" * 64
    state = await _fetch_from_forger(
        tmp_path, ctl, aiohttp_server, node_factory, manifest["image_id"],
        json.dumps(tampered).encode(), "torrent|image-torrent",
    )  # fmt: skip
    assert state["state"] == "failed" and "altered" in state["error"], state


async def test_node_refuses_a_signed_manifest_whose_chunk_torrent_differs(
    tmp_path: Path,
    controller: TestServer,
    aiohttp_client: ClientFactory,
    aiohttp_server: ServerFactory,
    node_factory: Callable[..., Awaitable[TestClient[Any, Any]]],
    ext4_pair: tuple[Path, Path, Path],
) -> None:
    """The node builds the chunk torrent from the manifest (it never downloads it) and checks
    it against the info-hash the manifest signs: a manifest signed by a trusted key whose
    info-hash is not that of its own chunks (a broken publisher) is refused."""
    ctl = await aiohttp_client(controller)
    v1, _, _ = ext4_pair
    data = await _publish(ctl, v1, "v1")
    key = keys.load(tmp_path / "controller-127.0.0.60" / "signing.key")
    good = mf.parse(mf.dumps(data))
    bad = dataclasses.replace(good, info_hash="0" * 64).signed(key)
    # Only the image torrent is on offer: a node that asked for the chunk torrent would fail
    # with "no image", not over the info-hash.
    state = await _fetch_from_forger(
        tmp_path, ctl, aiohttp_server, node_factory, good.image_id, bad.raw, "image-torrent"
    )
    assert state["state"] == "failed" and "info-hash" in state["error"], state


async def test_controller_gzips_the_manifest_for_clients_that_accept_it(
    controller: TestServer, aiohttp_client: ClientFactory, ext4_pair: tuple[Path, Path, Path]
) -> None:
    ctl = await aiohttp_client(controller)
    v1, _, _ = ext4_pair
    image_id = (await _publish(ctl, v1, "v1"))["image_id"]
    url = f"/api/v1/images/{image_id}/manifest"
    plain = await ctl.get(url, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    raw = await plain.read()
    packed = await ctl.get(url, headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert packed.headers["Content-Encoding"] == "gzip"
    body = await packed.read()
    assert gzip.decompress(body) == raw and len(body) < len(raw) / 2
    for header, packs in [
        ("gzip;q=0", False),
        ("deflate, gzip;q=0.5", True),
        ("*", True),
        ("GZIP", True),
        ("br", False),
        ("gzip;q=zero", False),
    ]:
        resp = await ctl.get(url, headers={"Accept-Encoding": header}, auto_decompress=False)
        assert ("Content-Encoding" in resp.headers) == packs, header
        assert resp.headers["Vary"] == "Accept-Encoding"


async def _node_holding_v1(
    tmp_path: Path,
    controller: TestServer,
    aiohttp_client: ClientFactory,
    node_factory: Callable[..., Awaitable[TestClient[Any, Any]]],
    ext4_pair: tuple[Path, Path, Path],
) -> tuple[TestClient[Any, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Publish v1 and v2; a node on 127.0.0.65 fetches v1 and cuts it into its store.
    Returns the node, both manifests and the node's final state of its v1 fetch."""
    ctl = await aiohttp_client(controller)
    v1, v2, _ = ext4_pair
    m1, m2 = await _publish(ctl, v1, "v1"), await _publish(ctl, v2, "v2")
    node = await node_factory("127.0.0.65", [_controller_key(tmp_path)], "http://127.0.0.60:7700")
    await node.post(f"/api/v1/images/{m1['image_id']}/fetch", headers=_auth())
    first = await _wait(node, m1["image_id"])
    assert first["state"] == "done", first
    for _ in range(100):  # a whole image is cut into the store after it is done
        if (await (await node.get(f"/api/v1/images/{m1['image_id']}")).json())["in_store"]:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("v1 was never cut into the node's store")
    return node, m1, m2, first


async def test_corrupt_chunk_on_node_disk_is_refetched_and_restart_keeps_images(
    tmp_path: Path,
    controller: TestServer,
    aiohttp_client: ClientFactory,
    node_factory: Callable[..., Awaitable[TestClient[Any, Any]]],
    ext4_pair: tuple[Path, Path, Path],
) -> None:
    node, m1, m2, first = await _node_holding_v1(
        tmp_path, controller, aiohttp_client, node_factory, ext4_pair
    )
    assert first["torrent"] == "image", first  # from scratch
    _, v2, _ = ext4_pair
    shared = {c["hash"] for c in m1["chunks"] if c["hash"]} & {
        c["hash"] for c in m2["chunks"] if c["hash"]
    }
    victim = sorted(shared)[0]
    path = tmp_path / "node-127.0.0.65" / "store" / "chunks" / victim[:2] / victim
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    await node.post(f"/api/v1/images/{m2['image_id']}/fetch", headers=_auth())
    state = await _wait(node, m2["image_id"])
    assert (state["state"], state["torrent"]) == ("done", "chunks"), state  # a delta
    image = tmp_path / "node-127.0.0.65" / "store" / "images" / f"{m2['image_id']}.img"
    assert image.read_bytes() == v2.read_bytes()
    await node.close()
    again = await node_factory("127.0.0.65", [_controller_key(tmp_path)], "http://127.0.0.60:7700")
    listed = (await (await again.get("/api/v1/images")).json())["images"]
    assert sorted((i["image_id"], i["state"]) for i in listed) == sorted(
        [(m1["image_id"], "done"), (m2["image_id"], "done")]
    )


async def test_a_whole_image_held_but_not_cut_before_a_restart_is_cut_on_start(
    tmp_path: Path,
    controller: TestServer,
    aiohttp_client: ClientFactory,
    node_factory: Callable[..., Awaitable[TestClient[Any, Any]]],
    ext4_pair: tuple[Path, Path, Path],
) -> None:
    """A crash between a whole-image fetch's "done" and its cut into the store leaves the
    image held but its chunks missing: on start the node cuts them from the local file
    (checking each) instead of fetching them again."""
    node, m1, _, _ = await _node_holding_v1(
        tmp_path, controller, aiohttp_client, node_factory, ext4_pair
    )
    await node.close()
    chunks = tmp_path / "node-127.0.0.65" / "store" / "chunks"
    held = {c["hash"]: c["length"] for c in m1["chunks"] if c["hash"]}
    for name in held:
        (chunks / name[:2] / name).unlink()
    again = await node_factory("127.0.0.65", [_controller_key(tmp_path)], "http://127.0.0.60:7700")
    state = await (await again.get(f"/api/v1/images/{m1['image_id']}")).json()
    assert (state["state"], state["in_store"]) == ("done", True), state
    assert sorted(p.name for p in chunks.glob("*/*")) == sorted(held)


async def test_a_node_holding_some_chunks_fetches_the_whole_image_without_their_bytes(
    tmp_path: Path,
    controller: TestServer,
    aiohttp_client: ClientFactory,
    node_factory: Callable[..., Awaitable[TestClient[Any, Any]]],
    ext4_pair: tuple[Path, Path, Path],
) -> None:
    """A node that lost most of v1's chunks takes v2 through the image torrent, but the
    chunks it still holds are copied into the image file instead of downloaded again."""
    node, m1, m2, _ = await _node_holding_v1(
        tmp_path, controller, aiohttp_client, node_factory, ext4_pair
    )
    _, v2, _ = ext4_pair
    # Lose the chunks of the first two thirds of the image (as if an older, shorter version
    # were held): the last third stays, in runs long enough to cover whole pieces.
    chunks = tmp_path / "node-127.0.0.65" / "store" / "chunks"
    order = list(dict.fromkeys(c["hash"] for c in m1["chunks"] if c["hash"]))
    for name in order[: len(order) * 2 // 3]:
        (chunks / name[:2] / name).unlink(missing_ok=True)
    kept = sum(p.stat().st_size for p in chunks.glob("*/*"))
    stored = sum({c["hash"]: c["length"] for c in m2["chunks"] if c["hash"]}.values())
    await node.post(f"/api/v1/images/{m2['image_id']}/fetch", headers=_auth())
    state = await _wait(node, m2["image_id"])
    assert (state["state"], state["torrent"]) == ("done", "image"), state
    local = state["bytes_by_source"]["local"]
    assert 0.9 * kept <= local <= kept, (local, kept)
    # What held chunks covered did not travel (pieces they only partly cover still do).
    assert state["received_bytes"] < stored - 0.5 * local, (state, stored)
    image = tmp_path / "node-127.0.0.65" / "store" / "images" / f"{m2['image_id']}.img"
    assert image.read_bytes() == v2.read_bytes()
