"""Object storage against a real SeaweedFS server with auth: access checks, manifests, torn checkpoints."""

from __future__ import annotations

import json

import pytest

from orchestrator.errors import StorageError
from orchestrator.storage.fs import describe_storage_error, open_storage
from orchestrator.storage.layout import RunLayout, checkpoint_step
from orchestrator.storage.manifest import build_manifest, hash_local_dir, is_complete, verify_local_copy, write_manifest
from tests.helpers import TEST_BUCKET


def test_writable_bucket_passes_the_check(s3_storage_uri):
    open_storage(s3_storage_uri).check_writable()


def test_wrong_secret_is_one_clear_line(object_store, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError) as error:
        open_storage(f"s3://{TEST_BUCKET}/x").check_writable()
    message = str(error.value)
    assert "access denied" in message and "\n" not in message
    assert object_store.secret_key not in message


def test_missing_bucket_is_reported(object_store):
    with pytest.raises(StorageError, match="no-such-bucket"):
        open_storage("s3://no-such-bucket/x").check_writable()


def test_unreachable_endpoint_is_reported(object_store, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="cannot reach|Could not connect"):
        open_storage(f"s3://{TEST_BUCKET}/x").check_writable()


@pytest.mark.parametrize("error_type", [FileNotFoundError, OSError, ConnectionError])
def test_a_refused_connection_reads_as_unreachable_whatever_s3fs_wraps_it_in(error_type):
    # s3fs has raised a refused connection as FileNotFoundError: the cause is still reachability.
    error = error_type('Could not connect to the endpoint URL: "http://127.0.0.1:9/bucket"')
    assert describe_storage_error(error).startswith("cannot reach the object store")


def test_a_missing_bucket_reads_as_missing():
    assert describe_storage_error(FileNotFoundError("bucket")).startswith("bucket or path does not exist")


@pytest.mark.parametrize("kind", [pytest.param("s3", marks=pytest.mark.slow), "file"])
def test_checkpoint_without_manifest_or_with_missing_file_is_incomplete(kind, request, tmp_path):
    uri = request.getfixturevalue("s3_storage_uri") if kind == "s3" else f"file://{tmp_path}/store"
    storage = open_storage(uri)
    layout = RunLayout(storage, "job", "run-1")
    local = tmp_path / "ckpt"
    (local / "adapter").mkdir(parents=True)
    (local / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (local / "trainer_state.json").write_text(json.dumps({"step": 5}))
    storage.upload_dir(local, layout.checkpoint(5))
    assert layout.checkpoint_steps() == [5]
    assert not is_complete(storage, layout.checkpoint(5)), "no manifest yet: must not count"
    write_manifest(storage, layout.checkpoint(5), build_manifest(hash_local_dir(local), step=5))
    assert is_complete(storage, layout.checkpoint(5))
    storage.fs.rm_file(f"{layout.checkpoint(5)}/trainer_state.json")
    assert not is_complete(storage, layout.checkpoint(5)), "a file listed in the manifest is gone"


@pytest.mark.parametrize("kind", [pytest.param("s3", marks=pytest.mark.slow), "file"])
def test_directories_go_up_and_down_file_by_file_in_parts(kind, request, tmp_path, monkeypatch):
    """Checkpoints (a 70B adapter's optimizer state is gigabytes) stream through upload_dir and download_dir: a
    file above two parts goes up as a multipart upload, and each comes back byte for byte with its digest."""
    from orchestrator.storage import fs as storage_fs

    monkeypatch.setattr(storage_fs, "UPLOAD_PART_BYTES", 5 * 2**20)  # S3's smallest part
    uri = request.getfixturevalue("s3_storage_uri") if kind == "s3" else f"file://{tmp_path}/store"
    storage = open_storage(uri)
    local = tmp_path / "up"
    (local / "optimizer").mkdir(parents=True)
    large = bytes(range(256)) * (12 * 2**20 // 256) + b"tail"  # 12 MB: three parts
    (local / "optimizer" / "state.safetensors").write_bytes(large)
    (local / "trainer_state.json").write_text("{}")
    remote = storage.path("streamed", kind)
    storage.upload_dir(local, remote)
    if kind == "s3":  # a multipart object's ETag is "<md5 of the parts' md5s>-<parts>"
        assert storage.fs.info(f"{remote}/optimizer/state.safetensors")["ETag"].strip('"').endswith("-3")
    else:
        assert not list((tmp_path / "store").rglob("*.tmp-*")), "temporary files are renamed into place"
    back = tmp_path / "down"
    storage.download_dir(remote, back)
    assert hash_local_dir(back) == hash_local_dir(local)
    assert (back / "optimizer" / "state.safetensors").read_bytes() == large


def test_local_copy_verification_detects_changed_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"one")
    manifest = build_manifest(hash_local_dir(tmp_path))
    assert verify_local_copy(tmp_path, manifest) == []
    (tmp_path / "a.bin").write_bytes(b"two")
    assert verify_local_copy(tmp_path, manifest) == ["a.bin"]
    assert "torch" in manifest["packages"] and "python" in manifest["packages"]


def test_checkpoint_names_sort_by_step():
    assert checkpoint_step("step-00000050") == 50
    assert checkpoint_step("checkpoint_manager_snapshot.json") is None


def test_embedded_store_enforces_auth(object_store):
    import s3fs

    anonymous = s3fs.S3FileSystem(anon=True, endpoint_url=object_store.endpoint_url, skip_instance_cache=True)
    with pytest.raises(PermissionError):
        anonymous.ls(TEST_BUCKET)


@pytest.mark.slow  # starts and stops a SeaweedFS server of its own, twice: ~8 s
def test_store_left_stopping_is_waited_for_by_the_next_start(tmp_path):
    """A command returns while its store finishes stopping; a start right after on the same data must
    wait for that server (it still holds the files), then serve everything written before."""
    import s3fs

    from orchestrator.storage.objectstore import EmbeddedObjectStore, _is_weed

    def client(store):
        return s3fs.S3FileSystem(key=store.access_key, secret=store.secret_key, endpoint_url=store.endpoint_url,
                                 skip_instance_cache=True)

    first = EmbeddedObjectStore(tmp_path / "data").start()
    client(first).pipe(f"{first.buckets[0]}/kept.txt", b"written before the stop")
    old_pid = first._process.pid
    first.stop(wait=False)
    assert _is_weed(old_pid), "the server exited before stop(wait=False) returned: nothing to test"

    second = EmbeddedObjectStore(tmp_path / "data").start(timeout_s=30)
    try:
        assert not _is_weed(old_pid)
        assert client(second).cat(f"{second.buckets[0]}/kept.txt") == b"written before the stop"
    finally:
        second.stop()


@pytest.mark.slow
def test_the_embedded_store_dies_with_the_process_that_started_it(tmp_path):
    """A driver killed outright (SIGKILL, OOM) must not leave its S3 server running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from orchestrator.storage.objectstore import EmbeddedObjectStore as S; "
        f"s = S(__import__('pathlib').Path({str(tmp_path / 'store')!r}), buckets=('bucket',)); s.start(); "
        "print(s._process.pid, flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{server}/stat") as stat:  # a zombie (exited, not yet reaped by init) counts as gone
            if stat.read().split(") ")[1].startswith("Z"):
                return
        time.sleep(0.2)
    raise AssertionError("the S3 server outlived the process that started it")
