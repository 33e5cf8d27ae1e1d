"""Integrity of registered folders: a sha256 manifest logged beside the files.

The manifest (MANIFEST, `{"algorithm": "sha256", "files": {relative path: sha256}}`) is
logged with the artifact folder, and the model version carries `manifest_digest(files)` as
its `sha256` tag, so `verify_folder` catches a corrupted download, a swapped file and a
swapped manifest alike.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from adapters_hub.registry.errors import ChecksumError

MANIFEST = "lisa_hub_sha256.json"


def build_manifest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under folder (the manifest file itself excluded)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = _sha256(path)
    return files


def manifest_json(files: dict[str, str]) -> str:
    return json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True)


def manifest_digest(files: dict[str, str]) -> str:
    """One digest for the folder: sha256 over "hash  path" lines, sorted (sha256sum's format)."""
    lines = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def verify_folder(folder: Path, expected_digest: str | None) -> None:
    """Raise ChecksumError unless folder holds exactly the manifest's files with their hashes."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ChecksumError(f"{folder}: no {MANIFEST}")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ChecksumError(f"{manifest_path}: unreadable manifest ({err})") from None
    if expected_digest and manifest_digest(files) != expected_digest:
        raise ChecksumError(f"{manifest_path}: manifest digest differs from the version's sha256 tag")
    actual = build_manifest(folder)
    missing, extra = sorted(set(files) - set(actual)), sorted(set(actual) - set(files))
    bad = sorted(rel for rel in set(files) & set(actual) if files[rel] != actual[rel])
    if missing or extra or bad:
        raise ChecksumError(f"{folder}: checksum mismatch (changed: {bad}, missing: {missing}, unexpected: {extra})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
