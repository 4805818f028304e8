"""Checks that need the model's config or the data, run on the driver before anything is written."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters import get_method
from orchestrator.builtin.datasets import resolve_data_path
from orchestrator.builtin.models import resolve_model_path
from orchestrator.errors import PreflightError, first_line
from orchestrator.launch.model_files import check_causal_lm, check_weights
from orchestrator.plan import estimate_adapter
from orchestrator.spec import JobSpec


@dataclass
class Resolved:
    model_path: str
    model_config: Any
    data_path: str
    eval_data_path: str | None
    notes: list[str] = field(default_factory=list)  # for the console: what the data check let through (skipped rows)


def load_model_config(spec: JobSpec) -> tuple[str, Any]:
    """The model's directory (or hub id) and config, once the config is known to make a causal LM (all
    that `plan` needs: it may plan a model whose weights are not downloaded yet)."""
    from transformers import AutoConfig

    model_path = resolve_model_path(spec.model.path)
    if model_path.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(model_path)):
        raise PreflightError(f"model.path: {spec.model.path} does not exist (a model directory or a hub id like org/name)")
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=spec.model.trust_remote_code)
    except Exception as error:  # OSError, ValueError, hub errors: all mean "not a usable model"
        raise PreflightError(f"model.path: {spec.model.path} is not a loadable model ({first_line(error)})") from None
    check_causal_lm(spec.model.path, config)
    return model_path, config


def check_adapter_fits(spec: JobSpec, model_config: Any) -> None:
    """Attach the adapter to the model on the meta device: it must match layers PEFT can adapt, and
    suit their shapes as its method requires."""
    adapted_layers = estimate_adapter(spec, model_config).adapted_layers
    problems = get_method(spec.adapter.method).check_layers(spec.adapter, adapted_layers)
    if problems:
        raise PreflightError("; ".join(problems))


def check_data(spec: JobSpec) -> tuple[str, str | None, list[str]]:
    """Read every row the run will use through the workers' own row rule (train/formats.py), streaming and
    writing nothing: the first bad row stops the run with one line naming the file and the row, or with
    data.bad_rows: skip is counted. The chat formats' template is tried on every sequence of roles.
    Returns the resolved data paths and what to tell the user (rows skipped)."""
    from orchestrator.train.data import check_rows
    from orchestrator.train.model import load_tokenizer

    tokenizer = functools.cache(lambda: load_tokenizer(resolve_model_path(spec.model.path), spec.model.trust_remote_code))
    resolved, notes = [], []
    for where, path in (("data.path", spec.data.path), ("data.eval_path", spec.data.eval_path)):
        resolved.append(resolve_data_path(path) if path else None)
        if path:
            note = check_rows(resolved[-1], spec.data, where, tokenizer).note(where, path)
            notes += [note] if note else []
    return resolved[0], resolved[1], notes


def preflight(spec: JobSpec) -> Resolved:
    model_path, model_config = load_model_config(spec)
    check_weights(spec.model.path, model_path)
    check_adapter_fits(spec, model_config)
    data_path, eval_path, notes = check_data(spec)
    return Resolved(_absolute_if_local(model_path), model_config, _absolute_if_local(data_path),
                    _absolute_if_local(eval_path), notes)


def _absolute_if_local(path: str | None) -> str | None:
    """A path found here, made absolute: Ray Train starts each worker in a directory of its own, where a path
    relative to the directory `run` was typed in names nothing (or, for a model, a hub id). Hub ids and URIs stay."""
    if path is None or "://" in path or not os.path.exists(os.path.expanduser(path)):
        return path
    return os.path.abspath(os.path.expanduser(path))
