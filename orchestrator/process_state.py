"""Records of local background processes: files written privately and atomically, processes named by pid and start.

A pid alone is not a process: once one exits, the system hands its pid to the next process started. A record
keeps the pid with the process's start time (the kernel's, in clock ticks since boot), and a process counts
as the recorded one only while both match. Records hold credentials, so they are readable by their owner only.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

# (pid, start time): the start time is None where /proc is missing (not Linux); then the pid alone is checked.
RecordedProcess = tuple[int, "int | None"]


def start_time(pid: int) -> int | None:
    """The process's start time (field 22 of /proc/PID/stat), or None when it is gone, a zombie, or /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
    return None if fields[0] == "Z" else int(fields[19])


def recorded(pid: int) -> RecordedProcess:
    return (pid, start_time(pid))


def is_running(process: RecordedProcess) -> bool:
    pid, started = process
    if started is None or not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    return start_time(pid) == started


def kill_all(processes: list[RecordedProcess], signum: int = signal.SIGKILL, wait_s: float = 15.0) -> None:
    """Send `signum` to those of `processes` still running and wait (up to `wait_s`) until none is."""
    for process in processes:
        if is_running(process):
            try:
                os.kill(process[0], signum)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + wait_s
    while any(is_running(process) for process in processes) and time.monotonic() < deadline:
        time.sleep(0.05)


def write_private_json(path: Path, data: dict) -> None:
    """Write `data` to `path` readable by its owner only (0600), atomically: a reader sees the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(data, file, indent=2)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict | None:
    """The record at `path`, or None when there is none (or it is not a JSON object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
