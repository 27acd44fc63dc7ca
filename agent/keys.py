"""Ed25519 signing keys: files on disk, public keys as text, signing and verifying bytes.

Private key files are PEM (PKCS#8), mode 0600. Public keys travel as
"ed25519:<base64 of the 32 raw bytes>", which fits on one line of a YAML config.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from imageswarm.agent.errors import KeyFileError, SignatureError

PREFIX = "ed25519:"


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """Parse "ed25519:<base64>"; ValueError names what is wrong."""
        if not text.startswith(PREFIX):
            raise ValueError(f"public key must start with {PREFIX!r}")
        try:
            raw = base64.b64decode(text[len(PREFIX) :], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"public key is not valid base64 ({exc})") from None
        if len(raw) != 32:
            raise ValueError(f"public key must be 32 bytes, got {len(raw)}")
        return cls(raw)

    def __str__(self) -> str:
        return PREFIX + base64.b64encode(self.raw).decode()

    @property
    def key_id(self) -> str:
        """A short, stable fingerprint: the first 16 hex digits of SHA-256 of the raw key."""
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(raw)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def generate(path: Path, *, overwrite: bool = False) -> SigningKey:
    """Create a new key file (mode 0600, written atomically); refuse to replace one."""
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return SigningKey(key)


def load(path: Path) -> SigningKey:
    """Load a private key file written by `generate` (or any PEM Ed25519 key)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"signing key {path} does not exist; create one with `imageswarm key generate {path}`"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return SigningKey(key)


def load_or_create(path: Path) -> SigningKey:
    """The controller's key: created on first start, loaded afterwards."""
    if path.exists():
        return load(path)
    return generate(path)


def verify_any(trusted: Iterable[PublicKey], key_id: str, signature: bytes, message: bytes) -> None:
    """Raise SignatureError unless a trusted key with `key_id` signed `message`."""
    for key in trusted:
        if key.key_id == key_id:
            if key.verify(signature, message):
                return
            raise SignatureError(f"signature does not match key {key_id}: the data was altered")
    raise SignatureError(f"signed by unknown key {key_id}; it is not in this node's trusted keys")
