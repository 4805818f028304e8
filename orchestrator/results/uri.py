"""Naming a result: the one parser of run, trial and search URIs (and of the paths `orchestrator runs` prints).

A result is named `[storage URI/]path`, the path being runs/<job>/<run-id>, tune/<search> or
tune/<search>/trials/<trial-id>; `show`, `compare` and `export` all take what `runs` prints.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

from orchestrator.errors import OrchestratorError
from orchestrator.storage.fs import Storage, open_storage
from orchestrator.storage.objectstore import DEFAULT_STORAGE, embedded_store_for

_RESULT_PATH = r"runs/[^/]+/[^/]+|tune/[^/]+(?:/trials/[^/]+)?"


def split_result_uri(text: str, default_storage: str | None = None) -> tuple[str, str]:
    """`s3://b/p/runs/<job>/<run-id>` (or `…/tune/<search>`, `…/tune/<search>/trials/<trial>`, or one of
    these paths relative to `default_storage`, as `orchestrator runs` prints them) → (storage URI, path)."""
    text = text.rstrip("/")
    match = re.fullmatch(rf"((?:s3|file)://.+?)/({_RESULT_PATH})", text)
    if match:
        return match.group(1), match.group(2)
    if "://" not in text and re.fullmatch(_RESULT_PATH, text):
        return (default_storage or DEFAULT_STORAGE).rstrip("/"), text
    raise OrchestratorError(f"{text}: not a run or search (expected [s3://bucket/prefix/]runs/<job>/<run-id>, "
                            f"…/tune/<search> or …/tune/<search>/trials/<trial-id>)")


def is_search(path: str) -> bool:
    """tune/<search> (its trials, tune/<search>/trials/<trial-id>, are runs)."""
    return path.startswith("tune/") and path.count("/") == 1


@contextmanager
def served_storage(storage_uri: str, endpoint_url: str | None = None, echo=print, check: bool = True) -> Iterator[Storage]:
    """The storage at `storage_uri` (with `check`, checked readable first); for s3://orchestrator/… with no
    other endpoint configured, local mode's embedded store is served for the duration."""
    with embedded_store_for(storage_uri, endpoint_url, echo):
        storage = open_storage(storage_uri, endpoint_url)
        if check:
            storage.check_readable()
        yield storage
