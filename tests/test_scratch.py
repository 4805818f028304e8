"""A worker's scratch folders outlive it only until the next worker starts on the machine."""

from __future__ import annotations

import os
import subprocess
import sys

from orchestrator.train import scratch


def test_only_the_folders_of_exited_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(scratch.tempfile, "tempdir", None)  # tempfile caches the folder it found first
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(exited.stdout)
    gone = tmp_path / f"orchestrator-pid{dead_pid}-step4-rank0-abc"
    (gone / "adapter").mkdir(parents=True)
    (gone / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    mine = scratch.scratch_dir("step8-rank1")
    parent = tmp_path / f"orchestrator-pid{os.getppid()}-resume-rank0-xyz"  # a live process other than this one
    parent.mkdir()
    unrelated = tmp_path / "orchestrator-pidfile"  # not a scratch folder's name
    unrelated.mkdir()

    assert mine.parent == tmp_path and mine.name.startswith(f"orchestrator-pid{os.getpid()}-step8-rank1-")
    assert scratch.remove_orphans() == [gone]
    assert not gone.exists() and mine.is_dir() and parent.is_dir() and unrelated.is_dir()
    assert scratch.remove_orphans() == []


def test_a_scratch_folder_goes_when_its_block_ends_even_by_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(scratch.tempfile, "tempdir", None)
    try:
        with scratch.scratch_folder("resume-rank0") as folder:
            (folder / "optimizer").mkdir()
            raise RuntimeError("a torn download")
    except RuntimeError:
        pass
    assert folder.name.startswith(f"orchestrator-pid{os.getpid()}-resume-rank0-") and not folder.exists()
