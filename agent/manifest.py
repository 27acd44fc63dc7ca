"""The signed manifest: the one place that knows its format.

A manifest describes one image completely: its size and SHA-256, the ordered list of chunks
that rebuild it (holes have no hash and are never stored), the kernels found in it, and the
BitTorrent v2 info-hashes of its two torrents: the one that carries its unique chunks
(`info_hash`) and the single-file one that carries the whole image (`image_info_hash`). The
signature covers every field (canonical JSON, sorted keys, no whitespace), so the info-hashes,
the chunk names and the image id are bound together by the controller's key.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imageswarm.agent.chunkhash import MAX_CHUNK, is_chunk_name
from imageswarm.agent.errors import ManifestError, SignatureError
from imageswarm.agent.keys import PublicKey, SigningKey, verify_any

FORMAT_VERSION = 2  # 2: image_info_hash
CHUNKING = "fastcdc2020:16k/64k/256k+extents+holes;name=bep52-root"
IMAGE_FORMATS = ("raw", "tar")
SOURCE_FORMATS = ("raw", "qcow2", "tar")


def image_id_for(sha256: str) -> str:
    """An image is named by its content: the first 16 hex digits of its (raw) SHA-256."""
    return sha256[:16]


@dataclass(frozen=True)
class ChunkEntry:
    """`length` bytes of the image: a stored chunk named `hash`, or a hole when hash is None."""

    hash: str | None
    length: int

    def to_json(self) -> dict[str, Any]:
        if self.hash is None:
            return {"hash": None, "length": self.length, "hole": True}
        return {"hash": self.hash, "length": self.length}


@dataclass(frozen=True)
class Manifest:
    image_id: str
    name: str
    created: str
    source_format: str
    format: str
    size: int
    sha256: str
    chunks: tuple[ChunkEntry, ...]
    kernels: tuple[str, ...]
    info_hash: str
    image_info_hash: str
    chunking: str = CHUNKING
    key_id: str = ""
    signature: str = ""
    raw: bytes = field(default=b"", compare=False, repr=False)

    def body(self) -> dict[str, Any]:
        """Every signed field, as JSON-ready data."""
        return {
            "format_version": FORMAT_VERSION,
            "image_id": self.image_id,
            "name": self.name,
            "created": self.created,
            "source_format": self.source_format,
            "format": self.format,
            "size": self.size,
            "sha256": self.sha256,
            "chunking": self.chunking,
            "chunks": [c.to_json() for c in self.chunks],
            "kernels": list(self.kernels),
            "info_hash": self.info_hash,
            "image_info_hash": self.image_info_hash,
            "key_id": self.key_id,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    def unique_chunks(self) -> dict[str, int]:
        """Stored chunks in first-use order: name -> length."""
        out: dict[str, int] = {}
        for c in self.chunks:
            if c.hash is not None:
                out.setdefault(c.hash, c.length)
        return out

    @property
    def stored_bytes(self) -> int:
        return sum(self.unique_chunks().values())

    def signed(self, key: SigningKey) -> Manifest:
        unsigned = Manifest(**{**self.__dict__, "key_id": key.public.key_id, "signature": ""})
        sig = key.sign(canonical(unsigned.body()))
        done = Manifest(**{**unsigned.__dict__, "signature": base64.b64encode(sig).decode()})
        return Manifest(**{**done.__dict__, "raw": dumps(done.to_json())})


def canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def dumps(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, indent=1).encode() + b"\n"


def _need(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise ManifestError(f"manifest has no {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ManifestError(f"manifest {key!r} has the wrong type ({type(value).__name__})")
    return value


def _hex(data: Mapping[str, Any], key: str, length: int) -> str:
    value: str = _need(data, key, str)
    if len(value) != length or any(c not in "0123456789abcdef" for c in value):
        raise ManifestError(f"manifest {key!r} must be {length} lowercase hex digits")
    return value


def _chunks(items: Iterable[Any]) -> tuple[ChunkEntry, ...]:
    out: list[ChunkEntry] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ManifestError(f"manifest chunk {index} is not an object")
        length = item.get("length")
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise ManifestError(f"manifest chunk {index} has no positive integer 'length'")
        name = item.get("hash")
        if name is None:
            if item.get("hole") is not True:
                raise ManifestError(f"manifest chunk {index} has no hash and is not a hole")
        elif not isinstance(name, str) or not is_chunk_name(name):
            raise ManifestError(f"manifest chunk {index} hash is not 64 lowercase hex digits")
        elif length > MAX_CHUNK:
            raise ManifestError(f"manifest chunk {index} is {length} bytes (max {MAX_CHUNK})")
        out.append(ChunkEntry(name, length))
    return tuple(out)


def parse(raw: bytes) -> Manifest:
    """Parse and check a manifest's structure (not its signature: see `verify`)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError("manifest is not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"manifest format_version {data.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    chunks = _chunks(_need(data, "chunks", list))
    size: int = _need(data, "size", int)
    if sum(c.length for c in chunks) != size:
        raise ManifestError("manifest chunk lengths do not add up to its size")
    fmt: str = _need(data, "format", str)
    if fmt not in IMAGE_FORMATS:
        raise ManifestError(f"manifest format {fmt!r} is not one of {IMAGE_FORMATS}")
    kernels = _need(data, "kernels", list)
    if not all(isinstance(k, str) for k in kernels):
        raise ManifestError("manifest 'kernels' must be a list of strings")
    image_id: str = _need(data, "image_id", str)
    if not image_id or not all(c.isalnum() or c in "-_." for c in image_id):
        raise ManifestError("manifest 'image_id' must be letters, digits, '-', '_' or '.'")
    return Manifest(
        image_id=image_id,
        name=_need(data, "name", str),
        created=_need(data, "created", str),
        source_format=_need(data, "source_format", str),
        format=fmt,
        size=size,
        sha256=_hex(data, "sha256", 64),
        chunks=chunks,
        kernels=tuple(kernels),
        info_hash=_hex(data, "info_hash", 64),
        image_info_hash=_hex(data, "image_info_hash", 64),
        chunking=_need(data, "chunking", str),
        key_id=_need(data, "key_id", str),
        signature=_need(data, "signature", str),
        raw=raw,
    )


def verify(raw: bytes, trusted: Iterable[PublicKey]) -> Manifest:
    """Parse `raw` and check its signature against `trusted`; the only way nodes read manifests."""
    manifest = parse(raw)
    data = json.loads(raw)
    data.pop("signature")
    try:
        signature = base64.b64decode(manifest.signature, validate=True)
    except binascii.Error:
        raise SignatureError("manifest signature is not valid base64") from None
    verify_any(trusted, manifest.key_id, signature, canonical(data))
    return manifest
