"""The job spec: typed pydantic models, YAML loading, `--set a.b=c` overrides, one-line errors."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from orchestrator.adapters import DEFAULT_METHOD, all_methods, get_method
from orchestrator.batching import global_batch, uneven_counts_message, uneven_worker_counts
from orchestrator.errors import JobSpecError
from orchestrator.search import TuneSpec, check_search


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Section):
    path: str = Field(description="HF model directory or hub id, or builtin:tiny-llama / builtin:tiny-qwen2.")
    trust_remote_code: bool = False


DataFormat = Literal["prompt_completion", "text", "messages", "alpaca", "sharegpt"]
CHAT_FORMATS = ("messages", "alpaca", "sharegpt")


class DataSpec(_Section):
    path: str = Field(description=(
        "jsonl | json | parquet | csv file, a saved dataset directory, a directory laid out like a Hub dataset "
        "(data/train-*.parquet), a Hub dataset id, s3://…, or builtin:arithmetic / builtin:chat."))
    format: Optional[DataFormat] = Field(None, description=(
        "prompt_completion (prompt_field, completion_field), text (text_field), messages (a list of {role, content} "
        "in messages_field, rendered by the chat template), alpaca (instruction, input, output) or sharegpt "
        "(conversations of {from, value}). Default: text with text_field; else prompt_completion when the data has "
        "prompt_field and completion_field; else whichever of messages, conversations (sharegpt), "
        "instruction + output (alpaca) and text the data has."))
    text_field: Optional[str] = Field(None, description="Train on the whole text of this field (causal LM).")
    prompt_field: Optional[str] = Field(None, description="Prompt field; the loss skips its tokens.")
    completion_field: Optional[str] = Field(None, description="Completion field; the loss covers only these tokens.")
    messages_field: Optional[str] = Field(None, description=(
        "messages / sharegpt: the field holding the conversation (default messages, or conversations for sharegpt)."))
    chat_template: Optional[str] = Field(None, description=(
        "messages / alpaca / sharegpt: a Jinja chat template, or a file holding one, instead of the tokenizer's own."))
    train_on: Literal["assistant", "last_assistant", "all"] = Field("assistant", description=(
        "What the loss covers. assistant: every assistant turn with its end-of-turn token (prompt_completion: the "
        "completion); last_assistant: the last assistant turn only; all: every token, prompts included. text "
        "always trains on every token."))
    max_length: int = Field(512, ge=1, description="Tokens per example; longer ones are truncated.")
    packing: bool = Field(False, description=(
        "Pack tokenized training examples into rows of max_length tokens: position ids restart at each example and "
        "no token attends across examples. Evaluation stays unpacked."))
    bad_rows: Literal["error", "skip"] = Field("error", description=(
        "A row that cannot be used (not UTF-8, not JSON, a field missing or null, a malformed conversation): error "
        "stops before anything runs and names the file and row; skip leaves such rows out and the run says how many."))
    split: str = Field("train", description="The split to read from a saved DatasetDict, a Hub-layout directory or a Hub dataset.")
    subset: Optional[str] = Field(None, description="The subset (configuration name) of a Hub-layout directory or Hub dataset.")
    eval_path: Optional[str] = Field(None, description="Separate evaluation data (same format); else eval_fraction of path.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of the examples held out for evaluation when there is no eval_path.")

    @model_validator(mode="after")
    def _one_format(self) -> "DataSpec":
        if self.text_field is not None and (self.prompt_field is not None or self.completion_field is not None):
            raise ValueError("give either text_field or prompt_field + completion_field, not both")
        if self.format is None and self.messages_field is not None:
            self.format = "messages"
        fields_of = {"text": ("text_field",), "prompt_completion": ("prompt_field", "completion_field"),
                     "messages": ("messages_field",), "sharegpt": ("messages_field",), "alpaca": ()}
        if self.format is not None:
            for name in ("text_field", "prompt_field", "completion_field", "messages_field"):
                if getattr(self, name) is not None and name not in fields_of[self.format]:
                    raise ValueError(f"{name} is not an option of format {self.format}")
            if self.chat_template is not None and self.format not in CHAT_FORMATS:
                raise ValueError(f"chat_template is for the chat formats (messages, alpaca, sharegpt), not {self.format}")
        if self.format == "text":
            self.text_field = self.text_field or "text"
        elif self.format in (None, "prompt_completion") and self.text_field is None:
            # Without a format, the data decide (launch/preflight, train/formats.py): these columns if present.
            self.prompt_field = self.prompt_field or "prompt"
            self.completion_field = self.completion_field or "completion"
        elif self.format in ("messages", "sharegpt"):
            self.messages_field = self.messages_field or ("messages" if self.format == "messages" else "conversations")
        return self


def _method_of(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("method", DEFAULT_METHOD)
    return getattr(value, "method", DEFAULT_METHOD)


def _adapter_union() -> Any:
    """A union of every registered method's spec, told apart by `method` (default: lora)."""
    names = ", ".join(sorted(method.name for method in all_methods()))
    members = tuple(Annotated[method.spec, Tag(method.name)] for method in all_methods())
    return Annotated[
        Union[members],
        Discriminator(_method_of, custom_error_type="unknown_method",
                      custom_error_message=f"known methods: {names}"),
    ]


AdapterSpec = _adapter_union()


class OptimSpec(_Section):
    lr: float = Field(2.0e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 turns clipping off.")
    lora_plus_ratio: Optional[float] = Field(
        None, gt=0, description="LoRA+: B's learning rate = ratio × A's (lr); ~16 is typical. lora and delta_lora only."
    )
    lora_plus_lr_embedding: float = Field(
        1e-6, gt=0, description=(
            "LoRA+: the learning rate of LoRA on embedding layers (both its A and B), as PEFT's "
            "create_loraplus_optimizer; used only when lora_plus_ratio is set."
        ),
    )


class TrainSpec(_Section):
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Micro-batch per worker; global batch = batch_size × grad_accum × num_workers.")
    grad_accum: int = Field(1, ge=1)
    eval_every: int = Field(20, ge=0, description="Steps between evaluations; 0 = only at the end.")
    eval_batches: int = Field(8, ge=1, description="Evaluation batches per worker.")
    checkpoint_every: int = Field(50, ge=0, description="Steps between checkpoints; 0 = only at the end.")
    keep_checkpoints: int = Field(3, ge=1, description="Most recent checkpoints kept in storage.")
    log_every: int = Field(5, ge=1)
    max_failures: int = Field(2, ge=0, description="Worker-group restarts (from the last checkpoint) before the run fails.")
    seed: int = 0
    gradient_checkpointing: bool = Field(False, description=(
        "Recompute each decoder layer's activations in backward instead of keeping them: activation memory "
        "of about one layer, for about a third more compute. For long sequences or large models on GPUs; "
        "the math is unchanged, so a run may resume with it switched."))
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description=(
        "Dtype of the base weights and the forward/backward: bf16 (DeepSpeed keeps an fp32 master copy of the "
        "adapter and its optimizer state) or fp32. auto: bf16 with scaling.use_gpu, fp32 on CPU."))


class DeepSpeedSpec(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    config: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed config merged over the generated one.")


class ScalingSpec(_Section):
    """Maps onto Ray Train's ScalingConfig; `orchestrator plan` shows what the cluster must hold."""

    num_workers: int = Field(2, ge=1, description="Training workers (DeepSpeed ranks); the most an elastic run uses.")
    min_workers: Optional[int] = Field(None, ge=1, description=(
        "Elastic training: start once this many workers can be placed, go on with fewer (down to this) after a "
        "node is lost and grow back to num_workers when nodes return, each time from the last checkpoint with the "
        "global batch kept (grad_accum adapts). Every count in between must divide the global batch."))
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu (one rank per GPU is usual).")
    cpus_per_worker: float = Field(1.0, gt=0, description=(
        "CPUs per worker (Ray sets each worker's torch threads from it). Left out in local mode: the "
        "machine's CPUs split evenly among the workers."))
    accelerator_type: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9_-]+$", description="Place workers only on nodes with this accelerator (Ray's name, e.g. A100, H100)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers' bundles across nodes."
    )
    gpu_memory_gb: Optional[float] = Field(None, gt=0, description=(
        "Memory of one accelerator in GB (use_gpu); `plan` warns when its per-GPU memory estimate exceeds it. "
        "Default: known from accelerator_type (A100 → 40, A100-80G → 80, H100 → 80, H200 → 141, …), else no check."))

    @model_validator(mode="after")
    def _gpu_memory_needs_gpus(self) -> "ScalingSpec":
        if self.gpu_memory_gb is not None and not self.use_gpu:
            raise ValueError("gpu_memory_gb needs use_gpu: true")
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers the run may train on: (num_workers, num_workers) unless elastic."""
        return (self.min_workers or self.num_workers, self.num_workers)


class StorageSpec(_Section):
    uri: Optional[str] = Field(None, description="s3://bucket/prefix or file:///dir; none in local mode = embedded S3 server.")
    endpoint_url: Optional[str] = Field(None, description="S3 endpoint (else AWS_ENDPOINT_URL or AWS's default).")
    shared_filesystem: bool = Field(
        False, description="A file:// uri is a filesystem every cluster node mounts (NFS, EFS, Lustre), so cluster jobs may use it."
    )

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: Optional[str]) -> Optional[str]:
        if uri is None:
            return uri
        match = re.match(r"^([a-z0-9+]+)://(.*)$", uri)
        if not match or match.group(1) not in ("s3", "file"):
            raise ValueError(f"must start with s3:// or file:// (got {uri!r})")
        if match.group(1) == "s3":
            bucket = match.group(2).split("/", 1)[0]
            if "@" in bucket or ":" in bucket:
                raise ValueError("must not hold credentials; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead")
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"bucket name {bucket!r} is not a valid S3 bucket name")
        return uri.rstrip("/")


class MlflowSpec(_Section):
    tracking_uri: Optional[str] = Field(
        None, description="MLflow tracking URI: http(s)://server, sqlite:///path.db, databricks, …; default MLFLOW_TRACKING_URI, "
                          "else sqlite:///~/.cache/orchestrator/mlflow.db (ORCHESTRATOR_HOME moves it)."
    )
    experiment: Optional[str] = Field(None, description="MLflow experiment (created if missing); default the job name.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: Optional[str]) -> Optional[str]:
        if uri is not None and "@" in uri.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("must not hold credentials; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                             "or MLFLOW_TRACKING_TOKEN instead")
        return uri


class TrackingSpec(_Section):
    mlflow: Optional[MlflowSpec] = Field(
        None, description="Log runs and searches to MLflow (pip install 'orchestrator[mlflow]'); `mlflow: {}` takes the defaults."
    )


class JobSpec(_Section):
    """A fine-tuning job: the base model, the data, the adapter method, and how to train, scale and store it."""

    name: str = Field(description="Job name (letters, digits, '_', '.', '-'); runs are stored under runs/<name>/.")
    model: ModelSpec
    data: DataSpec
    adapter: AdapterSpec = Field(default_factory=lambda: get_method(DEFAULT_METHOD).spec())  # type: ignore[valid-type]
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tune: Optional[TuneSpec] = Field(None, description="Hyperparameter search (orchestrator tune); ignored by run.")
    tracking: Optional[TrackingSpec] = Field(None, description="Experiment tracking (MLflow) for runs and searches.")

    @field_validator("name")
    @classmethod
    def _safe_as_a_path_segment(cls, name: str) -> str:
        if ".." in name:
            raise ValueError("must not contain '..'")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ValueError("use 1–100 letters, digits, '_', '.' or '-', starting with a letter or digit (no '/' or spaces)")
        return name

    @model_validator(mode="after")
    def _sections_fit_together(self) -> "JobSpec":
        # Cross-section rules; each message starts with the field to change, like every other error.
        problems = get_method(self.adapter.method).validate(self.adapter, self)
        if self.scaling.accelerator_type is not None and not self.scaling.use_gpu:
            problems.append("scaling.accelerator_type: needs scaling.use_gpu: true")
        low, high = self.scaling.worker_range
        total = global_batch(self.train.batch_size, self.train.grad_accum, high)
        uneven = uneven_worker_counts(total, low, high)
        if low > high:
            problems.append(f"scaling.min_workers: {low} is more than num_workers ({high})")
        elif uneven:
            problems.append(f"scaling.min_workers: {uneven_counts_message(total, uneven)}")
        if problems:
            raise ValueError("; ".join(problems))
        if self.tune is not None:
            check_search(self, _trial_problem)
        return self


def _trial_problem(raw: dict[str, Any]) -> Optional[str]:
    """Why a search trial's raw spec is invalid, in one line; None when it is valid."""
    try:
        JobSpec.model_validate(raw)
    except ValidationError as error:
        return describe_validation_error(error, raw)
    return None


MAX_SPEC_BYTES = 1 << 20  # a job spec is a page of YAML; a megabyte is not one


class _AliasRefused(Exception):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: nine levels of nine aliases expand to 9⁹ nodes from a few lines (a YAML
    "billion laughs"), and a job spec never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed in a "
                                f"job spec; write the value out")
        return super().compose_node(parent, index)


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a YAML job spec, apply `a.b=c` overrides, and validate it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise JobSpecError(f"{path}: {size:,} bytes is too large for a job spec (at most {MAX_SPEC_BYTES:,})")
        text = path.read_text()
    except OSError as error:
        raise JobSpecError(f"{path}: cannot read job spec ({error.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_NoAliasLoader)
    except _AliasRefused as refused:
        raise JobSpecError(f"{path}: {refused}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise JobSpecError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise JobSpecError(f"{path}: a job spec must be a YAML mapping (got {type(raw).__name__})")
    for override in overrides:
        apply_override(raw, override, source=str(path))
    return validate_spec(raw, source=str(path))


def validate_spec(raw: dict[str, Any], source: str = "<spec>") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        raise JobSpecError(f"{source}: {describe_validation_error(error, raw)}") from None


def apply_override(raw: dict[str, Any], override: str, source: str = "<spec>") -> None:
    """Set `a.b.c=value` in a raw spec dict; the value is parsed as YAML (`8`, `true`, `[q_proj]`)."""
    key, sep, value = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise JobSpecError(f"{source}: override {override!r} must look like section.field=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise JobSpecError(f"{source}: override {override!r}: {part} is not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError:
        raise JobSpecError(f"{source}: override {override!r}: value is not valid YAML") from None


def describe_validation_error(error: ValidationError, raw: dict[str, Any]) -> str:
    """One line per problem, joined: `adapter.r: Input should be ≥ 1 (got 0)`."""
    return "; ".join(_describe_one(detail, raw) for detail in error.errors())


def _describe_one(detail: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [part for part in detail["loc"] if not (isinstance(part, str) and part in _METHOD_TAGS)]
    field = ".".join(str(part) for part in loc)
    message = detail["msg"].removeprefix("Value error, ")
    if not field:  # a cross-section rule, whose message names its own field
        return message
    if detail["type"] == "extra_forbidden":
        known = _known_fields(loc[:-1], raw)
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else (f"; known fields: {', '.join(known)}" if known else "")
        return f"{field}: unknown field{hint}"
    if detail["type"] == "unknown_method":
        return f"{field}.method: unknown adapter method {_method_of(detail['input'])!r}; {message}"
    if detail["type"] == "missing":
        return f"{field}: required field is missing"
    if ("input" in detail and detail["type"] not in ("model_type", "dict_type") and not isinstance(detail["input"], dict)
            and repr(detail["input"]) not in message):
        return f"{field}: {message} (got {detail['input']!r})"
    return f"{field}: {message}"


_METHOD_TAGS = {method.name for method in all_methods()}


def _known_fields(loc: list[Any], raw: dict[str, Any]) -> list[str]:
    model: Any = JobSpec
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if part == "adapter":
            method = _method_of(raw.get("adapter") or {})
            model = next((m.spec for m in all_methods() if m.name == method), get_method(DEFAULT_METHOD).spec)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def spec_to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
