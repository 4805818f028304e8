"""Bad input that takes the command line, preflight (model, data, adapter fit), the object store or the
cluster to catch, table-driven: each case is one line. (A spec's own mistakes are one line each in
tests/test_spec.py, refused DeepSpeed configs in tests/test_plan.py, search spaces in tests/test_tune.py.)

Every case runs the real CLI entry point in-process and must give exit code 2, exactly one `error:` line
naming the cause and where, no traceback, and nothing written under the case's own storage prefix.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import orchestrator
from orchestrator import cli
from orchestrator.errors import PreflightError
from orchestrator.launch.model_files import check_weights, weight_problem
from orchestrator.launch.preflight import preflight
from orchestrator.launch.runtime import require_resources, with_local_cpu_share
from orchestrator.spec import load_spec
from orchestrator.storage.fs import open_storage
from tests.helpers import MINIMAL_SPEC, make_spec
from tests.ray_head import free_ports


@dataclass
class Case:
    id: str
    expect: str                                     # a substring of the one error line
    spec: dict = field(default_factory=dict)        # make_spec overrides: section → fields (merged), or key → value
    command: tuple = ("run",)                       # the CLI command and its extra arguments
    env: dict = field(default_factory=dict)


# Caught before any storage is opened or Ray started: the job's storage is a local folder, which stays empty.
CASES = [
    Case("rank-larger-than-layer", "adapter.r: 512 is larger than the smallest adapted layer dimension", {"adapter": {"r": 512}}),
    Case("targets-match-nothing", "adapter.target_modules: ['query', 'value'] match no linear layer, embedding or Conv1D of the "
         "model (its adaptable layers: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)",
         {"adapter": {"target_modules": ["query", "value"]}}),
    Case("model-missing", "model.path: /nonexistent/model does not exist", {"model": {"path": "/nonexistent/model"}}),
    Case("model-not-a-model", "model.path", {"model": {"path": "{junk_model}"}}),
    Case("model-is-an-encoder", "is not a causal language model (BertConfig, model_type 'bert', an encoder",
         {"model": {"path": "{bert_model}"}}),
    Case("model-without-weights", "has no weight files (model.safetensors, a sharded index", {"model": {"path": "{weightless_model}"}}),
    Case("model-shard-missing", "is missing 1 of the 3 weight shards its model.safetensors.index.json names (first: model-00002-of-00003",
         {"model": {"path": "{shard_missing_model}"}}),
    Case("model-weights-truncated", "has an unreadable weight file model.safetensors (Error while deserializing header",
         {"model": {"path": "{truncated_model}"}}),
    Case("data-missing", "data.path", {"data": {"path": "/nonexistent/data.jsonl"}}),
    Case("data-empty", "empty.jsonl is empty", {"data": {"path": "{empty_data}"}}),
    Case("data-without-fields", "prompt", {"data": {"path": "{fieldless_data}"}}),
    Case("search-without-tune-section", "tune: this job has no tune section", command=("tune",)),
    Case("cluster-unreachable", "connection refused", command=("submit", "--address", "http://127.0.0.1:{free_port}")),
    Case("cluster-client-address", "Ray Client address", command=("submit", "--address", "ray://127.0.0.1:10001")),
    Case("override-malformed", "must look like section.field=value", command=("run", "--set", "train.max_steps")),
    Case("override-into-a-value", "is not a section", command=("run", "--set", "name.x=1")),
]

# Caught by the storage check, the cluster fit or the run's history: against the session's Ray runtime and
# SeaweedFS (with auth), so slow.
SERVICE_CASES = [
    Case("more-gpus-than-cluster", "scaling: the job needs GPU 2 (it has 0)", {"scaling": {"use_gpu": True}}),
    Case("storage-bucket-missing", "bucket or path does not exist", {"storage": {"uri": "s3://no-such-bucket-here/x"}}),
    Case("storage-unreachable", "cannot reach the object store", {"storage": {"endpoint_url": "http://127.0.0.1:{free_port}"}}),
    Case("wrong-credentials", "access denied", env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
    Case("resume-missing-run", "no-such-run", command=("run", "--run-id", "no-such-run", "--resume")),
    Case("resume-without-runs", "--resume", command=("run", "--resume")),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    (root / "junk_model").mkdir()
    (root / "junk_model" / "config.json").write_text("{not json")
    (root / "empty.jsonl").write_text("")
    (root / "fieldless.jsonl").write_text("\n".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) for i in range(50)))
    return {"junk_model": str(root / "junk_model"), "empty_data": str(root / "empty.jsonl"),
            "fieldless_data": str(root / "fieldless.jsonl"), "free_port": str(free_ports(1)[0]), **bad_models(root)}


def bad_models(root: Path) -> dict[str, str]:
    """Model directories as users really produce them: `save_pretrained` output with a piece missing or
    broken, and a BERT's config. `sharded_model` is the control: complete, in three shards."""
    import torch
    from transformers import AutoModelForCausalLM, BertConfig

    from orchestrator.builtin.models import tiny_model_config

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(root / "bert")
    tiny_model_config("tiny-llama").save_pretrained(root / "weightless")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_model_config("tiny-llama"), dtype=torch.float32)
    model.save_pretrained(root / "sharded", max_shard_size="600KB")
    shutil.copytree(root / "sharded", root / "shard_missing")
    (root / "shard_missing" / "model-00002-of-00003.safetensors").unlink()
    model.save_pretrained(root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])  # a download cut short
    names = {"bert": "bert_model", "weightless": "weightless_model", "sharded": "sharded_model",
             "shard_missing": "shard_missing_model", "truncated": "truncated_model"}
    return {key: str(root / folder) for folder, key in names.items()}


@pytest.fixture
def local_job(tmp_path) -> dict:
    """The job CASES break, stored in a local folder (shared, so that `submit` takes it as a cluster's storage)."""
    return make_spec(f"file://{tmp_path}/store", raw=True, storage={"shared_filesystem": True})


def _fill(value, files: dict[str, str]):
    if isinstance(value, str):
        return value.format(**files) if "{" in value else value
    if isinstance(value, dict):
        return {k: _fill(v, files) for k, v in value.items()}
    return value


def _run_case(case: Case, job: dict, files: dict[str, str], tmp_path, monkeypatch, capsys) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(make_spec(base=job, raw=True, **_fill(case.spec, files))))
    command, *extra = case.command
    code = cli.main([command, str(job_file), *(_fill(arg, files) for arg in extra)])
    out, err = capsys.readouterr()
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert len(error_lines) == 1 and "Traceback" not in out + err, err
    assert case.expect in error_lines[0], error_lines[0]
    monkeypatch.undo()
    storage = open_storage(job["storage"]["uri"])
    assert storage.list_files(storage.root) == [], f"{case.id} wrote to storage"


def test_the_job_each_case_breaks_passes_validation_and_preflight(local_job, tmp_path):
    """The control: without its one change a case's job passes validation and preflight (model, adapter
    fit, data), so each error below comes from the case's own change."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(local_job))
    resolved = preflight(load_spec(job))
    assert resolved.model_config.model_type == "llama" and resolved.data_path.endswith(".jsonl")


def test_relative_model_and_data_paths_reach_the_workers_absolute(local_job, tmp_path, monkeypatch):
    """Ray Train starts each worker in a directory of its own: paths relative to where `run` was typed are made
    absolute for them (a relative model directory would otherwise be taken for a hub id there)."""
    from orchestrator.builtin.models import resolve_model_path

    shutil.copytree(resolve_model_path(local_job["model"]["path"]), tmp_path / "models" / "mine")
    shutil.copy(preflight(load_spec_from(local_job, tmp_path)).data_path, tmp_path / "train.jsonl")
    monkeypatch.chdir(tmp_path)
    resolved = preflight(load_spec_from({**local_job, "model": {"path": "models/mine"},
                                         "data": {**local_job["data"], "path": "train.jsonl", "eval_path": "./train.jsonl"}}, tmp_path))
    assert resolved.model_path == str(tmp_path / "models" / "mine")
    assert resolved.data_path == resolved.eval_data_path == str(tmp_path / "train.jsonl")


def load_spec_from(job: dict, directory: Path):
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return load_spec(path)


def test_the_job_each_service_case_breaks_passes_every_check_before_training(ray_session, s3_storage_uri, tmp_path):
    """The control of SERVICE_CASES: the storage check and the cluster fit pass too."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(make_spec(s3_storage_uri, raw=True)))
    spec = load_spec(job)
    resolved = preflight(spec)
    assert resolved.model_config.model_type == "llama" and resolved.data_path.endswith(".jsonl")
    open_storage(spec.storage.uri).check_writable()
    require_resources(with_local_cpu_share(spec))
    storage = open_storage(s3_storage_uri)
    assert storage.list_files(storage.root) == []


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, local_job, bad_files, tmp_path, monkeypatch, capsys):
    _run_case(case, local_job, bad_files, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("case", SERVICE_CASES, ids=lambda case: case.id)
def test_bad_storage_or_cluster_fit_is_one_line_exit_2_and_writes_nothing(case, ray_session, s3_storage_uri, bad_files, tmp_path,
                                                                          monkeypatch, capsys):
    _run_case(case, make_spec(s3_storage_uri, raw=True), bad_files, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("model", ["sharded_model", "weightless_model", "shard_missing_model", "truncated_model"])
def test_the_weight_check_agrees_with_from_pretrained(model, bad_files):
    """The reference is transformers itself: the directory the check passes loads, the ones it refuses do not."""
    import torch
    from transformers import AutoModelForCausalLM

    refused = weight_problem(Path(bad_files[model]))
    try:
        AutoModelForCausalLM.from_pretrained(bad_files[model], dtype=torch.float32)
        loads = True
    except Exception:
        loads = False
    assert (refused is None) == loads == (model == "sharded_model"), refused


def _hub_cache(root: Path, model_dir: str, weights: bool) -> Path:
    """A Hugging Face cache holding `org/tiny` as a download leaves it (refs/main → snapshots/<commit>/)."""
    repo = root / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot, ignore=None if weights else shutil.ignore_patterns("*.safetensors", "*.index.json"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return root


@pytest.mark.parametrize("weights", [True, False])
def test_an_offline_hub_id_is_checked_in_the_local_cache(weights, bad_files, tmp_path, monkeypatch):
    """Offline, loading can use only what the cache holds, so preflight checks that (no network: offline)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_hub_cache(tmp_path, bad_files["sharded_model"], weights)))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if weights:
        check_weights("org/tiny", "org/tiny")
    else:
        with pytest.raises(PreflightError, match=r"^model.path: org/tiny has no weight files \(model.safetensors"):
            check_weights("org/tiny", "org/tiny")


def test_plan_needs_only_the_config(bad_files):
    """A model can be planned before its weights are downloaded; `run` refuses it (CASES)."""
    plan = orchestrator.plan(make_spec(base=MINIMAL_SPEC, model={"path": bad_files["weightless_model"]}))
    assert plan.trainable_parameters > 0


def test_an_online_hub_id_leaves_the_weights_to_the_download(monkeypatch):
    """Online, weights not yet cached are normal (from_pretrained downloads them): nothing is looked up."""
    import huggingface_hub
    from huggingface_hub import constants

    def no_lookup(*args, **kwargs):
        raise AssertionError("the weight check looked the hub id up")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_lookup)
    check_weights("org/never-downloaded", "org/never-downloaded")


@pytest.mark.parametrize("config, options, refusal", [
    ("LlamaConfig", {}, None),
    ("GPT2Config", {}, None),
    ("BertConfig", {"is_decoder": True}, None),  # BertLMHeadModel: a decoder when the config says so
    ("T5Config", {}, "is not a causal language model (T5Config, model_type 't5': AutoModelForCausalLM has no class for it)"),
    ("RobertaConfig", {}, "is not a causal language model (RobertaConfig, model_type 'roberta', an encoder;"),
])
def test_only_configs_that_make_a_decoder_pass(config, options, refusal):
    import transformers

    from orchestrator.launch.model_files import check_causal_lm

    built = getattr(transformers, config)(**options)
    if refusal is None:
        check_causal_lm("m", built)
    else:
        with pytest.raises(PreflightError) as raised:
            check_causal_lm("m", built)
        assert str(raised.value).startswith(f"model.path: m {refusal}")
