"""Built-in tiny models and datasets, built locally on first use (no hub downloads) and cached."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from orchestrator.errors import PreflightError

BUILTIN_PREFIX = "builtin:"


def cache_home() -> Path:
    return Path(os.environ.get("ORCHESTRATOR_HOME", Path.home() / ".cache" / "orchestrator"))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temp dir and rename it into place, so concurrent builders never see half a build."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_builtin(path: str, field: str, known: dict, build: Callable[[str, Path], None], kind: str,
                    version: int = 1) -> Path | None:
    """For `builtin:NAME`, the cache directory holding NAME (built on first use); None for other paths.
    `version`: raise it when `build` changes what it builds, so that no cache keeps an older build."""
    if not path.startswith(BUILTIN_PREFIX):
        return None
    name = path[len(BUILTIN_PREFIX):]
    if name not in known:
        choices = ", ".join(BUILTIN_PREFIX + known_name for known_name in known)
        raise PreflightError(f"{field}: unknown built-in {kind} {path!r} (known: {choices})")
    directory = name if version == 1 else f"{name}-v{version}"
    return build_once(cache_home() / f"{kind}s" / directory, lambda staging: build(name, staging))
