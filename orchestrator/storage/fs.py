"""Storage URIs (s3://bucket/prefix, file:///dir) to fsspec filesystems, with one-line errors.

Credentials and endpoint come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL) or the standard AWS chain, never from the spec; nothing here prints them.
"""

from __future__ import annotations

import functools
import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import fsspec

from orchestrator.errors import StorageError, first_line


def _endpoint(explicit: str | None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@dataclass
class Storage:
    """A filesystem plus the root path of this project's data inside it."""

    uri: str
    fs: fsspec.AbstractFileSystem
    root: str

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def pyarrow_filesystem(self):
        """The same filesystem as pyarrow sees it (what Ray Train's RunConfig takes)."""
        import pyarrow.fs

        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))

    def write_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode())

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole object; on a local filesystem through a temp file so readers never see half of it."""
        if "file" in self.fs.protocol:
            self._write_local(path, lambda temp: self.fs.pipe_file(temp, data))
        else:
            self.fs.pipe_file(path, data)

    def _write_local(self, path: str, write: Callable[[str], None]) -> None:
        """`write(temp)`, then the temp file renamed to `path`: a reader sees the whole file or none."""
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        temp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        write(temp)
        os.replace(temp, path)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def list_dirs(self, path: str) -> list[str]:
        """Names of the immediate subdirectories of `path` (empty when it does not exist)."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")

    def list_files(self, path: str) -> list[str]:
        """Paths relative to `path` of every file below it."""
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path)
        except FileNotFoundError:
            return []
        prefix = path.rstrip("/") + "/"
        return sorted(name[len(prefix):] for name in found if name.startswith(prefix))

    def upload_dir(self, local_dir: str | Path, remote_dir: str) -> None:
        """File by file, streamed (put_file sends large files in parts): none is held in memory whole."""
        for file in sorted(Path(local_dir).rglob("*")):
            if file.is_file():
                remote = posixpath.join(remote_dir, file.relative_to(local_dir).as_posix())
                if "file" in self.fs.protocol:
                    self._write_local(remote, functools.partial(shutil.copyfile, file))
                else:
                    self.fs.put_file(str(file), remote, chunksize=UPLOAD_PART_BYTES)

    def download_dir(self, remote_dir: str, local_dir: str | Path) -> None:
        for relative in self.list_files(remote_dir):
            target = Path(local_dir) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(posixpath.join(remote_dir, relative), str(target))

    def copy_dir(self, source_dir: str, target_dir: str, last: str = "manifest.json") -> None:
        """Copy inside the store (S3 copies server-side), the file named `last` after all others: a directory whose
        manifest is there is whole."""
        files = self.list_files(source_dir)
        for relative in sorted(files, key=lambda name: name == last):
            target = posixpath.join(target_dir, relative)
            if "file" in self.fs.protocol:
                self._write_local(target, functools.partial(self.fs.copy, posixpath.join(source_dir, relative)))
            else:
                self.fs.copy(posixpath.join(source_dir, relative), target)

    def remove_dir(self, path: str) -> None:
        """Delete `path` and everything below it; nothing to do when it does not exist."""
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    @contextmanager
    def errors_in_one_line(self) -> Iterator[None]:
        """Any error of the block as one StorageError line naming this storage."""
        try:
            yield
        except Exception as error:  # s3fs raises many types; all mean the same to the user
            raise StorageError(f"storage {self.uri}: {describe_storage_error(error)}") from None

    def check_readable(self) -> None:
        """Fail in one line, before any reading, when the bucket (or directory) is missing or out of reach."""
        with self.errors_in_one_line():
            if "s3" in self.fs.protocol:
                self.fs.call_s3("head_bucket", Bucket=self.root.split("/", 1)[0])
            elif not self.fs.isdir(self.root):
                raise FileNotFoundError(self.root)

    def check_writable(self) -> None:
        """Write and delete a marker so bad buckets or credentials fail before any work starts."""
        marker = self.path(f".orchestrator-write-check-{uuid.uuid4().hex[:8]}")
        with self.errors_in_one_line():
            # Some S3 servers create a bucket on first write; a typo must not silently do that.
            if "s3" in self.fs.protocol:
                self.fs.call_s3("head_bucket", Bucket=self.root.split("/", 1)[0])
            self.fs.pipe_file(marker, b"ok")
            self.fs.rm_file(marker)


def describe_storage_error(error: Exception) -> str:
    text = first_line(error)
    if isinstance(error, PermissionError):
        return f"access denied — check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ({text})"
    # s3fs sometimes wraps a refused connection in FileNotFoundError, so reachability is judged first.
    unreachable = "Could not connect" in text or "Connect" in type(error).__name__
    if unreachable:
        return f"cannot reach the object store ({text})"
    if isinstance(error, FileNotFoundError) or "404" in text or "Not Found" in text:
        return f"bucket or path does not exist ({text})"
    if isinstance(error, OSError):
        return f"cannot reach the object store ({text})"
    return text


# The driver checks storage before anything starts and should fail in seconds; workers writing
# checkpoints should ride out a short outage of the store (botocore's standard mode: exponential
# backoff with jitter, capped at 20 s per wait; 10 attempts span roughly half a minute to two).
_FAIL_FAST = {"max_attempts": 3}
_PATIENT = {"max_attempts": 10, "mode": "standard"}


# A file above twice this goes up in parts of this size (boto3's transfers use 8 MB parts too): a worker
# holds one part of a checkpoint's optimizer state at a time, not the file (gigabytes for a 70B adapter).
UPLOAD_PART_BYTES = 8 * 2**20


def open_storage(uri: str, endpoint_url: str | None = None, patient: bool = False) -> Storage:
    """`patient`: retry connection failures with backoff for a minute or so (workers' uploads)."""
    scheme, _, rest = uri.partition("://")
    if scheme == "s3":
        import s3fs

        if not rest.split("/", 1)[0]:
            raise StorageError(f"storage {uri}: no bucket named")
        fs = s3fs.S3FileSystem(
            endpoint_url=_endpoint(endpoint_url),
            skip_instance_cache=True,
            use_listings_cache=False,
            config_kwargs={"connect_timeout": 5, "read_timeout": 60, "retries": _PATIENT if patient else _FAIL_FAST},
        )
        return Storage(uri=uri, fs=fs, root=rest.rstrip("/"))
    if scheme == "file":
        root = str(Path(rest).expanduser().resolve())
        return Storage(uri=uri, fs=fsspec.filesystem("file", auto_mkdir=True), root=root)
    raise StorageError(f"storage {uri}: unknown scheme {scheme!r} (use s3:// or file://)")
