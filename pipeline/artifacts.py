"""Artifacts on disk: a folder of files plus `manifest.json`, the contract between stages.

A manifest records what built the folder (stage, version, resolved config, parent fingerprint,
library versions, timings), what it holds (sha256 of every file) and what it measured. A folder
whose manifest is missing, unreadable, for another fingerprint, or whose files do not match
their checksums is not an artifact: the step loop (`pipeline/steps.py`) rebuilds it.

Hash once: a file is hashed when its step writes it, and its size and modification time go into the
manifest beside the sha256. Later checks trust a file whose size and modification time are
unchanged and hash only the others (`verify=True` hashes every file). The modification time is set
to two seconds before the hashing starts, so a write after that, even within the file system's
timestamp granularity, moves it. Sources outside the workdir (a GGUF file, a checkpoint folder, a
text file) cannot be stamped: `ChecksumCache` trusts them only when they were last modified more
than two seconds before they were hashed, as git does for racily clean files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from runtime.integrity import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TRACKED_LIBRARIES = (
    "torch",
    "transformers",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "tokenizers",
    "optimum",
    "optimum-onnx",
    "datasets",
    "gguf",
    "numpy",
    "llm-optimize",
)


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]


def fingerprint(*parts: Any) -> str:
    """sha256 over the canonical JSON of `parts` (configs must be fully resolved first)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


RACY_NS = 2_000_000_000  # a file modified this close to its hashing may change again within one timestamp tick


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """Checksums of every file under `folder` except the manifest, keyed by relative path, each with the
    size and the modification time it is stamped with (see the module's docstring)."""
    stamp = time.time_ns() - RACY_NS
    table = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            st = p.stat()
            entry = {"sha256": sha256_file(p), "bytes": st.st_size}
            if st.st_nlink > 1:  # linked to a source (the model step): its times are the source's, not ours to set;
                if st.st_mtime_ns < stamp:  # one modified just now is hashed on every load instead
                    entry["mtime_ns"] = st.st_mtime_ns
            else:
                os.utime(p, ns=(st.st_atime_ns, stamp))
                entry["mtime_ns"] = stamp
            table[p.relative_to(folder).as_posix()] = entry
    return table


def _unchanged(path: Path, entry: dict[str, Any]) -> bool:
    """The file still has the size and modification time it was hashed with (manifests without them: never)."""
    st = path.stat()
    return "mtime_ns" in entry and st.st_size == entry.get("bytes") and st.st_mtime_ns == entry["mtime_ns"]


class ChecksumCache:
    """sha256 of source files by (path, size, modification time, inode), kept in one JSON file of the workdir,
    so a run re-hashes an 8B checkpoint only when it changed. A file modified within two seconds of its
    hashing is hashed again next time (it might have changed within one timestamp tick)."""

    def __init__(self, path: Path | None, verify: bool = False):
        self.path, self.verify, self.entries = path, verify, {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                self.entries = {}  # a damaged cache costs one re-hash, never a wrong answer

    def sha256(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        key = str(path)
        stat = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.entries.get(key)
        if not self.verify and entry and entry["stat"] == stat and st.st_mtime_ns < entry["hashed_ns"] - RACY_NS:
            return entry["sha256"]
        hashed_ns = time.time_ns()
        digest = sha256_file(path)
        self.entries[key] = {"stat": stat, "hashed_ns": hashed_ns, "sha256": digest}
        if self.path is not None:
            write_json_atomic(self.path, self.entries)
        return digest


def library_versions(names: tuple[str, ...] = TRACKED_LIBRARIES) -> dict[str, str]:
    """Installed versions of `names` (those not installed are left out), with Python's."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_onnx(graph, path: Path, external_data: bool = True) -> None:
    """Save an ONNX graph; with external_data, its weights go to `<name>.data` beside it, referenced by
    a relative path (a 2 GB protobuf limit otherwise)."""
    import onnx

    if external_data:
        onnx.save_model(
            graph,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(graph, str(path))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def load_verified(folder: Path, expected_fp: str | None = None, verify: bool = False) -> tuple[Artifact | None, str]:
    """The artifact in `folder` if it is complete and untouched, else (None, why not). Files whose size and
    modification time are as recorded are not hashed again unless `verify`."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return None, "no manifest (incomplete or not an artifact)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        fp = manifest["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return None, f"manifest unreadable ({e})"
    if manifest.get("schema_version") != SCHEMA_VERSION:
        return None, f"manifest schema {manifest.get('schema_version')} != {SCHEMA_VERSION}"
    if expected_fp is not None and fp != expected_fp:
        return None, f"fingerprint {fp[:12]} != expected {expected_fp[:12]}"
    on_disk = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    for rel, entry in files.items():
        if rel not in on_disk:
            return None, f"file {rel} is missing"
        if (verify or not _unchanged(on_disk[rel], entry)) and sha256_file(on_disk[rel]) != entry["sha256"]:
            return None, f"file {rel} does not match its checksum (modified after it was written)"
    extra = sorted(set(on_disk) - set(files))
    if extra:
        return None, f"unexpected file {extra[0]} (added after it was written)"
    return Artifact(folder, manifest), "ok"


def load_artifact(folder: Path | str) -> Artifact:
    """Load a verified artifact for a user-facing command; raise ArtifactError if it is not one."""
    from pipeline.errors import ArtifactError

    folder = Path(folder)
    art, why = load_verified(folder)
    if art is None:
        raise ArtifactError(f"{folder}: not a usable artifact: {why}")
    return art
