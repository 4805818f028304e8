"""Checks that need the model's config or the data, run on the driver before anything is written."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from orchestrator.adapters import get_method
from orchestrator.builtin.datasets import resolve_data_path
from orchestrator.builtin.models import resolve_model_path
from orchestrator.errors import PreflightError
from orchestrator.plan import estimate_adapter
from orchestrator.spec import JobSpec


@dataclass
class Resolved:
    model_path: str
    model_config: Any
    data_path: str
    eval_data_path: str | None


def load_model_config(spec: JobSpec) -> tuple[str, Any]:
    from transformers import AutoConfig

    model_path = resolve_model_path(spec.model.path)
    if model_path.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(model_path)):
        raise PreflightError(f"model.path: {spec.model.path} does not exist (a model directory or a hub id like org/name)")
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=spec.model.trust_remote_code)
    except Exception as error:  # OSError, ValueError, hub errors: all mean "not a usable model"
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PreflightError(f"model.path: {spec.model.path} is not a loadable model ({first_line})") from None
    return model_path, config


def check_adapter_fits(spec: JobSpec, model_config: Any) -> None:
    """Attach the adapter to the model on the meta device: it must match layers PEFT can adapt, and
    suit their shapes as its method requires."""
    adapted_layers = estimate_adapter(spec, model_config).adapted_layers
    problems = get_method(spec.adapter.method).check_layers(spec.adapter, adapted_layers)
    if problems:
        raise PreflightError("; ".join(problems))


def check_data(spec: JobSpec) -> tuple[str, str | None]:
    from orchestrator.train.data import check_fields, load_records

    data_path = resolve_data_path(spec.data.path)
    check_fields(load_records(data_path), spec.data, data_path)
    eval_path = spec.data.eval_path
    if eval_path:
        eval_path = resolve_data_path(eval_path)
        check_fields(load_records(eval_path), spec.data, eval_path)
    return data_path, eval_path


def preflight(spec: JobSpec) -> Resolved:
    model_path, model_config = load_model_config(spec)
    check_adapter_fits(spec, model_config)
    data_path, eval_path = check_data(spec)
    return Resolved(model_path, model_config, data_path, eval_path)
