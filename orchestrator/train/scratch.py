"""A worker's local scratch folders (the latest checkpoint's local copy, a resume's download), named after the
process that owns them, so that the next worker on the machine removes those of processes that are gone.

A worker that ends normally removes its own. One that is killed cannot: a search's trials stopped by their
scheduler, a failed worker replaced, a preempted node, Ctrl-C during a save. Each left a whole checkpoint
(adapter, optimizer state) in the temporary folder, for every such stop, until the disk filled.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_PREFIX = "orchestrator-pid"
_OWNER = re.compile(rf"^{_PREFIX}(\d+)-")


def scratch_dir(purpose: str) -> Path:
    """A new folder in the temporary folder, owned by this process; `purpose` names it (e.g. `step10-rank0`)."""
    return Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-{purpose}-"))


@contextmanager
def scratch_folder(purpose: str) -> Iterator[Path]:
    """A scratch folder (as `scratch_dir`) that is removed when the block ends, however it ends."""
    folder = scratch_dir(purpose)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphans(root: str | Path | None = None) -> list[Path]:
    """Remove the scratch folders whose process has exited; returns them. A folder of a live process (this
    one, a worker of another run on the machine, or an unrelated process that got a dead one's pid) is kept."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        owner = _OWNER.match(path.name)
        if owner is None or not path.is_dir() or _alive(int(owner.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
