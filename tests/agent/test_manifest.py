"""Manifests: signing, verification, and refusal of every kind of tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imageswarm.agent import keys
from imageswarm.agent import manifest as mf
from imageswarm.agent.errors import KeyFileError, ManifestError, SignatureError


def _manifest() -> mf.Manifest:
    chunks = (
        mf.ChunkEntry("ab" * 32, 1000),
        mf.ChunkEntry(None, 5000),
        mf.ChunkEntry("cd" * 32, 24),
    )
    return mf.Manifest(
        image_id="0123456789abcdef",
        name="demo",
        created="2026-11-29T00:00:00Z",
        source_format="raw",
        format="raw",
        size=6024,
        sha256="ef" * 32,
        chunks=chunks,
        kernels=("6.1.0-test",),
        info_hash="12" * 32,
        image_info_hash="34" * 32,
    )


@pytest.fixture
def key(tmp_path: Path) -> keys.SigningKey:
    return keys.generate(tmp_path / "k.pem")


def test_signed_manifest_round_trips(key: keys.SigningKey) -> None:
    signed = _manifest().signed(key)
    back = mf.verify(signed.raw, [key.public])
    assert back == signed
    assert back.unique_chunks() == {"ab" * 32: 1000, "cd" * 32: 24}
    data = json.loads(signed.raw)
    assert {"image_id", "name", "size", "sha256", "chunks", "signature"} <= set(data)
    assert data["chunks"][1] == {"hash": None, "length": 5000, "hole": True}


@pytest.mark.parametrize(
    "field,value",
    [("name", "evil"), ("size", 6025), ("info_hash", "34" * 32), ("kernels", ["other"])],
)
def test_tampered_field_is_refused(key: keys.SigningKey, field: str, value: object) -> None:
    data = json.loads(_manifest().signed(key).raw)
    data[field] = value
    if field == "size":
        data["chunks"][1]["length"] += 1  # keep it structurally valid: only the signature fails
    with pytest.raises(SignatureError, match="altered"):
        mf.verify(json.dumps(data).encode(), [key.public])


def test_unknown_key_is_refused(key: keys.SigningKey, tmp_path: Path) -> None:
    other = keys.generate(tmp_path / "other.pem")
    with pytest.raises(SignatureError, match="unknown key"):
        mf.verify(_manifest().signed(key).raw, [other.public])


def test_wrong_signature_is_refused(key: keys.SigningKey, tmp_path: Path) -> None:
    other = keys.generate(tmp_path / "other.pem")
    data = json.loads(_manifest().signed(other).raw)
    data["key_id"] = key.public.key_id  # claims to be signed by the trusted key
    with pytest.raises(SignatureError):
        mf.verify(json.dumps(data).encode(), [key.public])


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("chunks"), "no 'chunks'"),
        (lambda d: d.update(size="big"), "wrong type"),
        (lambda d: d.update(sha256="xyz"), "hex"),
        (lambda d: d["chunks"].append({"hash": "00" * 32, "length": 0}), "positive"),
        (lambda d: d["chunks"].append({"hash": None, "length": 5}), "not a hole"),
        (lambda d: d["chunks"][0].update(length=1 << 30), "add up|max"),
        (lambda d: d.update(format_version=99), "format_version"),
    ],
)
def test_malformed_manifest_names_the_problem(
    key: keys.SigningKey, mutate: object, message: str
) -> None:
    data = json.loads(_manifest().signed(key).raw)
    assert callable(mutate)
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        mf.verify(json.dumps(data).encode(), [key.public])


def test_garbage_is_not_a_manifest(key: keys.SigningKey) -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        mf.verify(b"\x00garbage", [key.public])
    with pytest.raises(ManifestError, match="not a JSON object"):
        mf.verify(b"[1, 2]", [key.public])


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "signing.key"
    key = keys.generate(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert keys.load(path).public == key.public
    assert keys.PublicKey.parse(str(key.public)) == key.public
    with pytest.raises(KeyFileError, match="already exists"):
        keys.generate(path)
    with pytest.raises(KeyFileError, match="key generate"):
        keys.load(tmp_path / "missing.key")
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(KeyFileError, match="not a PEM"):
        keys.load(tmp_path / "bad.key")
    for bad in ("rsa:abc", "ed25519:!!!", "ed25519:AAAA"):
        with pytest.raises(ValueError):
            keys.PublicKey.parse(bad)
    assert (
        keys.load_or_create(tmp_path / "new.key").public == keys.load(tmp_path / "new.key").public
    )
