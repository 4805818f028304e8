"""Manifests: sha256 of every file, written last, so a checkpoint or run without one does not exist."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from orchestrator.storage.fs import Storage

MANIFEST_NAME = "manifest.json"
_PACKAGES = ("orchestrator", "torch", "ray", "deepspeed", "peft", "transformers", "datasets", "s3fs", "pyarrow")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Streamed: an adapter's optimizer state can be gigabytes, which a worker should not hold twice."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def hash_local_dir(local_dir: str | Path) -> dict[str, str]:
    """{relative posix path: sha256} for every file below `local_dir`."""
    root = Path(local_dir)
    return {
        file.relative_to(root).as_posix(): sha256_file(file)
        for file in sorted(root.rglob("*"))
        if file.is_file()
    }


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def build_manifest(files: dict[str, str], **extra) -> dict:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": dict(sorted(files.items())),
        "packages": package_versions(),
        **extra,
    }


def write_manifest(storage: Storage, directory: str, manifest: dict) -> None:
    storage.write_text(f"{directory}/{MANIFEST_NAME}", json.dumps(manifest, indent=2, sort_keys=False))


def read_manifest(storage: Storage, directory: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(f"{directory}/{MANIFEST_NAME}"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(storage: Storage, directory: str) -> bool:
    """A directory is complete when its manifest exists and lists exactly the files that are there."""
    manifest = read_manifest(storage, directory)
    if manifest is None:
        return False
    present = set(storage.list_files(directory)) - {MANIFEST_NAME}
    return set(manifest["files"]) <= present


def verify_local_copy(local_dir: str | Path, manifest: dict) -> list[str]:
    """Files of the manifest that are missing or differ in a downloaded copy (empty list = intact)."""
    actual = hash_local_dir(local_dir)
    return [name for name, digest in manifest["files"].items() if actual.get(name) != digest]
