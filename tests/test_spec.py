"""Job specs: every shipped job validates; invalid specs give one line naming the field and file."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from orchestrator.errors import JobSpecError
from orchestrator.spec import load_spec, spec_to_yaml, validate_spec
from tests.helpers import MINIMAL_SPEC, REPO, make_spec


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("job_file", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_validates_with_every_value_as_written(job_file):
    import yaml

    spec = load_spec(job_file)
    # The docs run `jobs/<name>.yaml` and point at runs/<name>/: the file's stem is the job's name.
    assert spec.name == job_file.stem
    # Nothing the example sets is dropped, renamed or coerced on the way in.
    held = dict(_leaves(spec.model_dump(mode="json")))
    written = dict(_leaves(yaml.safe_load(job_file.read_text())))
    assert {key: held.get(key, "<missing>") for key in written} == written


def test_issue_field_names_are_the_public_interface():
    spec = load_spec(REPO / "jobs" / "local-smoke.yaml")
    assert spec.adapter.method == "lora"
    assert {"r", "alpha", "dropout", "target_modules"} <= set(spec.adapter.model_fields_set)
    assert spec.data.prompt_field == "prompt" and spec.data.completion_field == "completion"
    assert spec.deepspeed.zero_stage == 2 and spec.scaling.num_workers == 2 and spec.storage.uri is None


def test_overrides_set_nested_fields_with_yaml_types():
    spec = load_spec(REPO / "jobs" / "local-smoke.yaml", ["train.max_steps=50", "adapter.target_modules=[q_proj]", "adapter.rslora=true"])
    assert spec.train.max_steps == 50
    assert spec.adapter.target_modules == ["q_proj"]
    assert spec.adapter.rslora is True


# Each case is the minimal spec with these sections (or top-level values) set; None removes a key.
@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"adapter": {"r": 0}}, "adapter.r: Input should be greater than or equal to 1 (got 0)"),
        ({"adapter": {"alpha": 0}}, "adapter.alpha: Input should be greater than 0"),
        ({"adapter": {"dropout": 1.0}}, "adapter.dropout: Input should be less than 1"),
        ({"adapter": {"dropout": -0.1}}, "adapter.dropout: Input should be greater than or equal to 0 (got -0.1)"),
        ({"adapter": {"method": "dora"}}, "adapter.method: unknown adapter method 'dora'; known methods: delta_lora, lora, lora_fa, vera"),
        # each method carries only its own options
        ({"adapter": {"method": "vera", "alpha": 16}}, "adapter.alpha: unknown field"),
        ({"adapter": {"method": "lora", "project_gradient": True}}, "adapter.project_gradient: unknown field"),
        ({"adapter": {"method": "delta_lora", "dropout": 0.1}}, "adapter.dropout: unknown field"),
        ({"adapter": {"method": "vera", "d_initial": 0}}, "adapter.d_initial: Input should be greater than 0"),
        ({"adapter": {"method": "delta_lora", "update_ratio": -1}}, "adapter.update_ratio: Input should be greater than or equal to 0"),
        ({"adapter": {"method": "delta_lora", "start_step": 99}, "train": {"max_steps": 100}},
         "adapter.start_step: 99 leaves no iteration after it below train.max_steps (100)"),
        ({"adapter": {"method": "vera"}, "optim": {"lora_plus_ratio": 16}},
         "optim.lora_plus_ratio: LoRA+ sets B's learning rate relative to A's, but adapter method 'vera'"),
        ({"adapter": {"method": "lora_fa"}, "optim": {"lora_plus_ratio": 16}},
         "optim.lora_plus_ratio: LoRA+ sets B's learning rate relative to A's, but adapter method 'lora_fa' does not train both"),
        ({"optim": {"lora_plus_ratio": 0}}, "optim.lora_plus_ratio: Input should be greater than 0"),
        ({"train": {"batch_sise": 8}}, "train.batch_sise: unknown field; did you mean 'batch_size'?"),
        ({"train": {"max_steps": "many"}}, "train.max_steps: Input should be a valid integer"),
        ({"train": {"batch_size": 0}}, "train.batch_size: Input should be greater than or equal to 1"),
        ({"data": {"max_length": 0}}, "data.max_length: Input should be greater than or equal to 1"),
        ({"scaling": {"num_workers": 0}}, "scaling.num_workers: Input should be greater than or equal to 1"),
        ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
        ({"storage": {"uri": "gs://bucket/x"}}, "storage.uri: Value error, must start with s3:// or file://"),
        ({"storage": {"uri": "s3://AKIA:secret@bucket/x"}}, "must not hold credentials"),
        ({"storage": {"uri": "s3://Bad_Bucket/x"}}, "is not a valid S3 bucket name"),
        ({"data": {"text_field": "text", "prompt_field": "p"}}, "data: Value error, give either text_field"),
        ({"name": "../escape"}, "name: must not contain '..'"),
        ({"name": "a..b"}, "name: Value error, must not contain '..'"),
        ({"name": "team/job"}, "name: use 1–100 letters, digits"),
        ({"model": None}, "model: required field is missing"),
        ({"modle": {}}, "modle: unknown field; did you mean 'model'?"),
    ],
)
def test_invalid_specs_name_the_field(sections, expected):
    with pytest.raises(JobSpecError) as error:
        validate_spec(make_spec(base=MINIMAL_SPEC, raw=True, **sections), source="job.yaml")
    message = str(error.value)
    assert message.startswith("job.yaml: ")
    assert expected.replace("Value error, ", "") in message
    assert "\n" not in message


@pytest.mark.parametrize("text, expected", [
    ("name: x\nmodel: {path: [\n", "malformed YAML at line 3, column 1"),
    ("- just\n- a list\n", "a job spec must be a YAML mapping"),
    # A YAML "billion laughs": nine levels of nine aliases would expand to 9**9 nodes.
    ("name: x\ndeepspeed:\n  config:\n    a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"    {chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8)),
     "line 5: YAML aliases (*a) are not allowed in a job spec; write the value out"),
    ("name: x\n" + "#" * (1 << 20), f"{(1 << 20) + 8:,} bytes is too large for a job spec (at most 1,048,576)"),
], ids=["malformed-yaml", "not-a-mapping", "alias-bomb", "too-large"])
def test_unreadable_job_file_names_the_file_and_why(tmp_path, text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(JobSpecError, match=re.escape(f"{bad}: {expected}")):
        load_spec(bad)


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {path: m}\ndata: {path: d.jsonl}\nadapter: {method: lora, r: -1}\n")
    result = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {bad}: adapter.r: Input should be greater than or equal to 1 (got -1)"


def test_stored_spec_round_trips():
    spec = load_spec(REPO / "jobs" / "local-smoke.yaml")
    import yaml

    assert validate_spec(yaml.safe_load(spec_to_yaml(spec))) == spec


def test_adapter_without_method_is_lora_and_each_method_parses_its_options():
    assert make_spec(base=MINIMAL_SPEC, adapter={"r": 4}).adapter.method == "lora"
    spec = make_spec(base=MINIMAL_SPEC, adapter={"method": "delta_lora", "start_step": 5, "update_ratio": 1.5}, optim={"lora_plus_ratio": 16})
    assert (spec.adapter.start_step, spec.adapter.update_ratio, spec.optim.lora_plus_ratio) == (5, 1.5, 16)
    assert make_spec(base=MINIMAL_SPEC, adapter={"method": "lora_fa", "project_gradient": True}).adapter.project_gradient is True
    assert make_spec(base=MINIMAL_SPEC, adapter={"method": "vera", "r": 512}).adapter.save_projection is True


def test_reading_a_spec_does_not_load_torch():
    """`validate`, `submit`, `runs` and friends read specs; importing torch for that took ~1 s per command."""
    code = ("import sys; from orchestrator.cli import main; code = main(['validate', 'jobs/local-smoke.yaml']); "
            "assert code == 0; print(sorted(m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_resume_check_fills_in_fields_added_since_a_run_was_stored():
    from orchestrator.errors import JobSpecError
    from orchestrator.launch.run import check_same_run

    spec = make_spec(base=MINIMAL_SPEC, optim={"lr": 1e-3, "lora_plus_ratio": 4})
    stored = spec.model_dump(mode="json")
    del stored["optim"]["lora_plus_lr_embedding"]  # written before the field existed
    check_same_run(stored, spec, "old-run")
    stored["optim"]["lr"] = 2e-3
    with pytest.raises(JobSpecError, match=r"^optim: differs from the spec stored with run old-run"):
        check_same_run(stored, spec, "old-run")


def test_a_pbt_trial_may_change_exactly_the_fields_its_scheduler_perturbs():
    from orchestrator.errors import JobSpecError
    from orchestrator.launch.run import check_same_run
    from orchestrator.search.space import MUTABLE_MID_RUN

    spec = make_spec(base=MINIMAL_SPEC, optim={"lr": 1e-3, "lora_plus_ratio": 4})
    stored = spec.model_dump(mode="json")
    stored["optim"].update(lr=2e-3, lora_plus_ratio=8)
    check_same_run(stored, spec, "trial-1", may_change=MUTABLE_MID_RUN)
    with pytest.raises(JobSpecError, match=r"^optim: differs"):
        check_same_run(stored, spec, "trial-1", may_change=("optim.lr",))
    stored["optim"]["weight_decay"] = 0.5
    with pytest.raises(JobSpecError, match=r"^optim: differs"):
        check_same_run(stored, spec, "trial-1", may_change=MUTABLE_MID_RUN)
