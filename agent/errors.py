"""Every error the agent raises, written down once.

ImageSwarmError      raised for any expected failure; its message is shown to the user as is.
  InvalidInputError  raised when caller-supplied input (a file, an argument) is unusable.
    ImageFormatError raised when an image file is truncated, corrupt or of an unknown format.
  ManifestError      raised when a manifest is malformed or does not match what it describes.
    SignatureError   raised when a signature is missing, wrong, or made by an untrusted key.
  KeyFileError       raised when a key file is missing, unreadable or not an Ed25519 key.
  StoreError         raised when the chunk store is inconsistent or an operation on it fails.
    ChunkMissingError raised when a chunk an operation needs is not in the store.
    ChunkCorruptError raised when a chunk on disk does not hash to its name.
  ToolError          raised when an external tool (qemu-img, debugfs, mount) fails.
"""

from __future__ import annotations


class ImageSwarmError(Exception):
    """Base of all expected errors; str(err) is a complete, user-facing sentence."""


class InvalidInputError(ImageSwarmError):
    pass


class ImageFormatError(InvalidInputError):
    pass


class ManifestError(ImageSwarmError):
    pass


class SignatureError(ManifestError):
    pass


class KeyFileError(ImageSwarmError):
    pass


class StoreError(ImageSwarmError):
    pass


class ChunkMissingError(StoreError):
    pass


class ChunkCorruptError(StoreError):
    pass


class ToolError(ImageSwarmError):
    pass
