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
  HookError          raised when a hook fails or times out (carries the phase's runs).
  ApplyError         raised when an apply fails; says whether the root was rolled back.
  StateError         raised when the agent's state dir is unusable or locked by another run.
"""

from __future__ import annotations

from collections.abc import Sequence


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


class HookError(ImageSwarmError):
    """Raised when a hook fails or times out; carries the runs of its phase so far."""

    def __init__(self, message: str, runs: Sequence[object]) -> None:
        super().__init__(message)
        self.runs = runs


class ApplyError(ImageSwarmError):
    """Raised when an apply fails; the message says whether the root was rolled back."""


class StateError(ImageSwarmError):
    """Raised when the agent's state dir or journal is unusable or locked by another run."""
