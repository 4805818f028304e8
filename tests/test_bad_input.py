"""Bad input, table-driven: each case is one line in CASES.

Every case runs the real CLI entry point (in-process, against the session's real Ray runtime and
SeaweedFS with auth) and must give exit code 2, exactly one `error:` line naming the cause and
where, no traceback, and nothing written under the case's own storage prefix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import yaml

from orchestrator import cli
from orchestrator.launch.preflight import preflight
from orchestrator.launch.runtime import require_resources, with_local_cpu_share
from orchestrator.spec import load_spec
from orchestrator.storage.fs import open_storage
from ray_head import free_ports


@dataclass
class Case:
    id: str
    expect: str                                     # a substring of the one error line
    spec: dict = field(default_factory=dict)        # dotted path → value (None deletes the field)
    raw: str | None = None                          # the job file's whole text instead of a spec
    command: tuple = ("run",)                       # the CLI command and its extra arguments
    env: dict = field(default_factory=dict)


CASES = [
    Case("malformed-yaml", "job.yaml: malformed YAML at line 3, column 1", raw="name: x\nmodel: {path: [\n"),
    Case("not-a-mapping", "a job spec must be a YAML mapping", raw="- just\n- a list\n"),
    Case("unknown-field", "train.batch_sise: unknown field; did you mean 'batch_size'?", {"train.batch_sise": 4}),
    Case("wrong-type", "train.max_steps: Input should be a valid integer", {"train.max_steps": "ten"}),
    Case("rank-zero", "adapter.r: Input should be greater than or equal to 1", {"adapter.r": 0}),
    Case("rank-larger-than-layer", "adapter.r", {"adapter.r": 4096}),
    Case("alpha-not-positive", "adapter.alpha: Input should be greater than 0", {"adapter.alpha": 0}),
    Case("dropout-one", "adapter.dropout: Input should be less than 1", {"adapter.dropout": 1.0}),
    Case("dropout-negative", "adapter.dropout: Input should be greater than or equal to 0", {"adapter.dropout": -0.1}),
    Case("targets-match-nothing", "adapter.target_modules", {"adapter.target_modules": ["no_such_proj"]}),
    Case("unknown-method", "adapter.method: unknown adapter method 'dora'", {"adapter.method": "dora"}),
    Case("deepspeed-optimizer-block", "deepspeed.config", {"deepspeed.config": {"optimizer": {"type": "Adam"}}}),
    Case("zero-stage-contradiction", "zero_optimization.stage", {"deepspeed.config": {"zero_optimization": {"stage": 3}}}),
    Case("lora-plus-on-lora-fa", "optim.lora_plus_ratio: LoRA+", {"adapter.method": "lora_fa", "optim.lora_plus_ratio": 16}),
    Case("lora-plus-on-vera", "optim.lora_plus_ratio: LoRA+", {"adapter": {"method": "vera", "r": 16}, "optim.lora_plus_ratio": 4}),
    Case("delta-start-after-end", "adapter.start_step", {"adapter": {"method": "delta_lora", "r": 4, "start_step": 50}}),
    Case("model-missing", "model.path: /nonexistent/model does not exist", {"model.path": "/nonexistent/model"}),
    Case("model-not-a-model", "model.path", {"model.path": "{junk_model}"}),
    Case("data-missing", "data.path", {"data.path": "/nonexistent/data.jsonl"}),
    Case("data-empty", "empty.jsonl is empty", {"data.path": "{empty_data}"}),
    Case("data-without-fields", "prompt", {"data.path": "{fieldless_data}"}),
    Case("max-length-zero", "data.max_length: Input should be greater than or equal to 1", {"data.max_length": 0}),
    Case("batch-size-zero", "train.batch_size: Input should be greater than or equal to 1", {"train.batch_size": 0}),
    Case("workers-zero", "scaling.num_workers: Input should be greater than or equal to 1", {"scaling.num_workers": 0}),
    Case("more-gpus-than-cluster", "scaling: the job needs GPU 2 (it has 0)", {"scaling.use_gpu": True}),
    Case("storage-unknown-scheme", "storage.uri: must start with s3:// or file://", {"storage.uri": "gs://bucket/x"}),
    Case("storage-invalid-bucket", "is not a valid S3 bucket name", {"storage.uri": "s3://Bad_Bucket/x"}),
    Case("storage-uri-with-credentials", "must not hold credentials", {"storage.uri": "s3://AKIA:s3cr3t@bucket/x"}),
    Case("storage-bucket-missing", "bucket or path does not exist", {"storage.uri": "s3://no-such-bucket-here/x"}),
    Case("storage-unreachable", "cannot reach the object store", {"storage.endpoint_url": "http://127.0.0.1:{free_port}"}),
    Case("wrong-credentials", "access denied", env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
    Case("name-with-separator", "name: use 1–100 letters, digits", {"name": "team/job"}),
    Case("name-with-dotdot", "name: must not contain '..'", {"name": "a..b"}),
    Case("search-unknown-field", "tune.space.optim.weight_decy: unknown field; did you mean 'weight_decay'?",
         {"tune": {"space": {"optim.weight_decy": {"choice": [0.01]}}}}, command=("tune",)),
    Case("search-empty-choices", "tune.space.adapter.r", {"tune": {"space": {"adapter.r": {"choice": []}}}}, command=("tune",)),
    Case("search-without-tune-section", "tune: this job has no tune section", command=("tune",)),
    Case("cluster-unreachable", "connection refused", command=("submit", "--address", "http://127.0.0.1:{free_port}")),
    Case("cluster-client-address", "Ray Client address", command=("submit", "--address", "ray://127.0.0.1:10001")),
    Case("resume-missing-run", "no-such-run", command=("run", "--run-id", "no-such-run", "--resume")),
    Case("resume-without-runs", "--resume", command=("run", "--resume")),
    Case("override-malformed", "must look like section.field=value", command=("run", "--set", "train.max_steps")),
    Case("override-into-a-value", "is not a section", command=("run", "--set", "name.x=1")),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    (root / "junk_model").mkdir()
    (root / "junk_model" / "config.json").write_text("{not json")
    (root / "empty.jsonl").write_text("")
    (root / "fieldless.jsonl").write_text("\n".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) for i in range(50)))
    return {"junk_model": str(root / "junk_model"), "empty_data": str(root / "empty.jsonl"),
            "fieldless_data": str(root / "fieldless.jsonl"), "free_port": str(free_ports(1)[0])}


def _fill(value, files: dict[str, str]):
    if isinstance(value, str):
        return value.format(**files) if "{" in value else value
    if isinstance(value, dict):
        return {k: _fill(v, files) for k, v in value.items()}
    return value


def _job_text(case: Case, storage_uri: str, files: dict[str, str]) -> str:
    if case.raw is not None:
        return case.raw
    spec = {
        "name": "bad-input", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic", "max_length": 32},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 10, "batch_size": 4, "eval_every": 5, "checkpoint_every": 5},
        "scaling": {"num_workers": 2}, "storage": {"uri": storage_uri},
    }
    for dotted, value in case.spec.items():
        value = _fill(value, files)
        if "." in dotted:
            section, name = dotted.split(".", 1)
            spec.setdefault(section, {})[name] = value
        else:
            spec[dotted] = value
    return yaml.safe_dump(spec)


def test_the_job_each_case_breaks_passes_every_check_before_training(ray_session, s3_storage_uri, bad_files, tmp_path):
    """The control: without its one change a case's job passes validation, preflight (model, adapter fit,
    data), the storage check and the cluster fit, so each error below comes from the case's own change."""
    job = tmp_path / "job.yaml"
    job.write_text(_job_text(Case("control", expect=""), s3_storage_uri, bad_files))
    spec = load_spec(job)
    resolved = preflight(spec)
    assert resolved.model_config.model_type == "llama" and resolved.data_path.endswith(".jsonl")
    open_storage(spec.storage.uri).check_writable()
    require_resources(with_local_cpu_share(spec))
    storage = open_storage(s3_storage_uri)
    assert storage.list_files(storage.root) == []


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, ray_session, s3_storage_uri, bad_files, tmp_path,
                                                         monkeypatch, capsys):
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    job = tmp_path / "job.yaml"
    job.write_text(_job_text(case, s3_storage_uri, bad_files))
    command, *extra = case.command
    code = cli.main([command, str(job), *(_fill(arg, bad_files) for arg in extra)])
    out, err = capsys.readouterr()
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert len(error_lines) == 1 and "Traceback" not in out + err, err
    assert case.expect in error_lines[0], error_lines[0]
    monkeypatch.undo()
    storage = open_storage(s3_storage_uri)
    assert storage.list_files(storage.root) == [], f"{case.id} wrote to storage"
