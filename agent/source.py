"""Getting an image ready to apply: verified, kept for rollback, and opened as a tree.

Sources are a local file (`--image FILE [--sha256 HEX]`: raw, qcow2 or tar) or an image the
node's chunk store holds (signed manifest + whole-image SHA-256). Either way the image is hashed
once, its id derived the same way `publish` derives it, and a copy is kept in the state dir so
a later rollback does not depend on the store or the original file.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from imageswarm.agent import imagefile
from imageswarm.agent.errors import ImageFormatError, InvalidInputError, SignatureError, ToolError
from imageswarm.agent.journal import ImageRef, StateDir
from imageswarm.agent.keys import PublicKey
from imageswarm.agent.manifest import image_id_for
from imageswarm.agent.mounts import mounted_image
from imageswarm.agent.store import Store


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _check_mountable(path: Path) -> None:
    if imagefile.filesystem_kind(path) is None:
        raise ImageFormatError(
            f"{path} is a disk image without a filesystem at its start (a partitioned disk?); "
            "the agent applies filesystem images (ext2/3/4, xfs) or tar archives"
        )


def import_file(state: StateDir, path: Path, sha256: str | None = None) -> ImageRef:
    """Verify a local image file and keep it in the state dir."""
    if not path.is_file():
        raise InvalidInputError(f"image file {path} does not exist")
    fmt = imagefile.detect_format(path)
    imagefile.check_complete(path, fmt)
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise InvalidInputError(f"{path} has SHA-256 {actual}, not {sha256} as expected")
    source = path
    if fmt == "qcow2":
        source = state.path / "work" / f"convert-{secrets.token_hex(6)}.img"
        imagefile.convert_to_raw(path, source)
        fmt = "raw"
    try:
        if fmt == "raw":
            _check_mountable(source)
        digest = sha256_file(source)
        return state.keep_image(image_id_for(digest), source, fmt)
    finally:
        if source != path:
            source.unlink(missing_ok=True)


def import_store(
    state: StateDir, store_dir: Path, image_id: str, trusted: Iterable[PublicKey]
) -> ImageRef:
    """Verify an image the node's store holds (signature, then whole-image SHA-256) and keep it."""
    store = Store.open(store_dir, create=False)
    try:
        manifest = store.load_manifest(image_id, list(trusted))
    except SignatureError as exc:
        raise SignatureError(f"image {image_id} in {store_dir}: {exc}") from None
    path = store.image_path(image_id)
    if not path.exists():
        store.assemble(manifest)
    actual = sha256_file(path)
    if actual != manifest.sha256:
        raise ImageFormatError(
            f"image {image_id} in {store_dir} has SHA-256 {actual}, not {manifest.sha256} "
            "as its signed manifest says"
        )
    if manifest.format == "raw":
        _check_mountable(path)
    return state.keep_image(image_id, path, manifest.format)


@contextlib.contextmanager
def image_tree(ref: ImageRef, workdir: Path) -> Iterator[Path]:
    """The image's files as a directory: a read-only loop mount, or an extracted tar."""
    if ref.format == "raw":
        kind = imagefile.filesystem_kind(ref.path)
        fstype = {"ext": "ext4", "xfs": "xfs"}.get(kind or "")
        with mounted_image(ref.path, workdir / "image", fstype) as tree:
            yield tree
        return
    tree = workdir / "tree"
    done = workdir / "tree.complete"
    if not done.exists():
        subprocess.run(["rm", "-rf", str(tree)], check=True)
        tree.mkdir(parents=True)
        proc = subprocess.run(
            [
                "tar",
                "--numeric-owner",
                "--xattrs",
                "--acls",
                "-xpf",
                str(ref.path),
                "-C",
                str(tree),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise ToolError(f"extracting {ref.path} failed: {proc.stderr.strip()[-500:]}")
        done.touch()
    yield tree
