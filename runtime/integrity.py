"""Is an exported artifact whole before the runner loads it.

The export step's manifest.json lists every file with its size and SHA-256. Sizes are checked on
every load (one stat per file: a truncated or replaced `model.onnx.data` is caught before ONNX
Runtime reads it); the checksums only when asked (`--verify`), since hashing a large model's
weights takes seconds to minutes. A folder without a manifest (written by another tool) is loaded
as it is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from runtime.errors import RuntimeFailure

MANIFEST = "manifest.json"
REBUILD = "rebuild it (optimize RECIPE --force) or copy it again"


def check_artifact(folder: Path, verify: bool = False) -> None:
    """Raise RuntimeFailure naming the first file that is missing, of the wrong size or (with `verify`) changed."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(rel, int(entry["bytes"]), str(entry["sha256"])) for rel, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RuntimeFailure(f"{manifest}: unreadable ({type(e).__name__}); {REBUILD}") from None
    for rel, size, digest in entries:
        path = inside(folder, rel, MANIFEST)
        if not path.is_file():
            raise RuntimeFailure(f"{path}: missing (listed in {MANIFEST}); {REBUILD}")
        actual = path.stat().st_size
        if actual != size:
            raise RuntimeFailure(
                f"{path}: {actual} bytes where {MANIFEST} says {size} (truncated or replaced); {REBUILD}"
            )
        if verify and sha256_file(path) != digest:
            raise RuntimeFailure(f"{path}: does not match its checksum in {MANIFEST} (changed after export); {REBUILD}")


def inside(folder: Path, relative: str, named_by: str) -> Path:
    """folder / relative, refused when it would leave `folder` (a path read from a file is data, not a place)."""
    path = Path(folder) / relative
    if Path(relative).is_absolute() or not path.resolve().is_relative_to(Path(folder).resolve()):
        raise RuntimeFailure(f"{folder}: {named_by} names '{relative}', outside the artifact folder; {REBUILD}")
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
