"""Search: the space is validated before anything starts; a real local search with ASHA on 2 CPUs
stops poor trials early, publishes a leaderboard, curves and the best adapter; --resume reruns only
what did not finish; a trial exports like a run."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import orchestrator
from orchestrator import cli
from orchestrator.errors import JobSpecError, OrchestratorError
from orchestrator.launch.runtime import TRIAL_SLOTS
from orchestrator.launch.tune import max_concurrent_trials, trial_driver_resources
from orchestrator.search import trial_raw
from orchestrator.spec import validate_spec
from orchestrator.storage.fs import open_storage
from orchestrator.train.faults import schedule_fault
from tests.helpers import MINIMAL_SPEC, make_spec


def with_space(space: dict, **tune) -> dict:
    """A search over `space` (the raw spec): 20 steps, evaluated every 5, checkpointed every 10."""
    return make_spec(base=MINIMAL_SPEC, raw=True, name="s", train={"max_steps": 20, "eval_every": 5, "checkpoint_every": 10},
                     tune={"space": space, **tune})


@pytest.mark.parametrize(
    "space, expected",
    [
        ({"adapter.rank": {"choice": [4]}}, "tune.space.adapter.rank: adapter method 'lora' has no field 'rank'"),
        ({"optim.lrr": {"choice": [1e-3]}}, "tune.space.optim.lrr: unknown field; did you mean 'lr'?"),
        ({"model.path": {"choice": ["x"]}}, "tune.space.model.path: only fields of adapter, optim, train, deepspeed can be searched"),
        ({"adapter.r": {"choice": []}}, "tune.space.adapter.r: choice must not be empty"),
        ({"optim.lr": {"loguniform": [0, 1e-3]}}, "tune.space.optim.lr: loguniform needs low > 0"),
        ({"optim.lr": {"uniform": [1e-3, 1e-4]}}, "tune.space.optim.lr: bounds must be [low, high] with low < high"),
        ({"optim.lr": {"uniform": [1e-4, 1e-3], "choice": [1]}}, "give exactly one of choice, grid, uniform, loguniform, randint"),
        ({"adapter.r": {"choice": [0, 8]}}, "tune.space.adapter.r: value 0 gives an invalid trial: adapter.r: Input should be greater than or equal to 1"),
        ({"adapter.method": {"choice": ["lora", "dora"]}}, "tune.space.adapter.method: unknown adapter method 'dora'"),
        ({"adapter.method": {"choice": ["lora", "vera"]}, "adapter.d_initial@lora": {"choice": [0.1]}},
         "tune.space.adapter.d_initial@lora: adapter method 'lora' has no field 'd_initial'"),
        ({"adapter.r@vera": {"choice": [256]}}, "tune.space.adapter.r@vera: method 'vera' is not searched"),
        ({"adapter.project_gradient": {"choice": [True]}}, "adapter method 'lora' has no field 'project_gradient'"),
    ],
)
def test_invalid_spaces_fail_before_launch(space, expected):
    with pytest.raises(JobSpecError) as error:
        validate_spec(with_space(space), source="search.yaml")
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_search_needs_evaluations_that_line_up_with_checkpoints():
    raw = with_space({"optim.lr": {"choice": [1e-3]}})
    raw["train"] = {**raw["train"], "checkpoint_every": 7}
    with pytest.raises(JobSpecError, match="checkpoint_every must be a multiple of eval_every"):
        validate_spec(raw)


def test_method_conditional_dimensions_apply_only_where_they_exist():
    spec = validate_spec(with_space({
        "adapter.method": {"choice": ["lora", "lora_fa", "vera"]},
        "adapter.r@lora,lora_fa": {"choice": [4, 8]},
        "adapter.r@vera": {"choice": [256, 512]},
        "optim.lora_plus_ratio": {"loguniform": [1, 32]},
        "adapter.dropout": {"choice": [0.0, 0.1]},
    }))
    base = spec.model_dump(mode="json", exclude={"tune"})
    vera = validate_spec(trial_raw(base, {"adapter.method": "vera", "adapter.r@lora,lora_fa": 4, "adapter.r@vera": 512,
                                          "optim.lora_plus_ratio": 8.0, "adapter.dropout": 0.1}))
    assert (vera.adapter.method, vera.adapter.r, vera.optim.lora_plus_ratio) == ("vera", 512, None)
    lora_fa = validate_spec(trial_raw(base, {"adapter.method": "lora_fa", "adapter.r@lora,lora_fa": 4,
                                             "adapter.r@vera": 512, "optim.lora_plus_ratio": 8.0}))
    assert (lora_fa.adapter.r, lora_fa.optim.lora_plus_ratio) == (4, None)
    lora = validate_spec(trial_raw(base, {"adapter.method": "lora", "adapter.r@lora,lora_fa": 8, "optim.lora_plus_ratio": 8.0}))
    assert (lora.adapter.r, lora.optim.lora_plus_ratio) == (8, 8.0)


def test_concurrency_is_what_the_cluster_holds():
    spec = validate_spec({**with_space({"optim.lr": {"choice": [1e-3]}}, num_samples=8), "scaling": {"num_workers": 2}})
    assert max_concurrent_trials(spec, {"CPU": 16}) == 7          # 7 × (2 + 0.01) ≤ 16
    assert max_concurrent_trials(spec, {"CPU": 3}) == 1
    with pytest.raises(OrchestratorError, match="one trial needs 2.01 CPUs but the Ray cluster has 1 CPUs"):
        max_concurrent_trials(spec, {"CPU": 1})
    gpu = validate_spec({**with_space({"optim.lr": {"choice": [1e-3]}}, num_samples=8, max_concurrent_trials=3),
                         "scaling": {"num_workers": 2, "use_gpu": True}})
    assert max_concurrent_trials(gpu, {"CPU": 64, "GPU": 8}) == 3
    assert max_concurrent_trials(gpu, {"CPU": 64, "GPU": 2}) == 1
    with pytest.raises(OrchestratorError, match="a trial's driver needs 1 GiB of Ray's memory resource"):
        max_concurrent_trials(spec, {"CPU": 16, "memory": 2**29})


@pytest.mark.parametrize("concurrency", [1, 2, 3, 7, 64])
def test_trial_slots_let_exactly_the_concurrent_trials_drivers_live(concurrency):
    spec = validate_spec(with_space({"optim.lr": {"grid": [1e-5, 5e-3]}}, scheduler={"type": "sha"}, max_concurrent_trials=concurrency))
    share = trial_driver_resources(spec, concurrency, {"CPU": 16, TRIAL_SLOTS: 1.0})[TRIAL_SLOTS]
    assert concurrency * share <= 1.0 < (concurrency + 1) * share
    # A Ray without the slots (a cluster not set up from cluster/) cannot cap a pausing scheduler's live trials.
    with pytest.raises(OrchestratorError, match=f"tune.max_concurrent_trials: sha creates every trial at once and this Ray cluster has no {TRIAL_SLOTS}"):
        trial_driver_resources(spec, concurrency, {"CPU": 16})
    # Without the cap asked for, the drivers' memory bounds them there; asha's searcher caps its live trials itself.
    uncapped = validate_spec(with_space({"optim.lr": {"grid": [1e-5, 5e-3]}}, scheduler={"type": "sha"}))
    asha = validate_spec(with_space({"optim.lr": {"grid": [1e-5, 5e-3]}}, max_concurrent_trials=concurrency))
    for job in (uncapped, asha):
        assert TRIAL_SLOTS not in trial_driver_resources(job, concurrency, {"CPU": 16})


@pytest.mark.slow
def test_every_ray_the_project_starts_has_the_trial_slots(ray_session):
    import ray

    assert ray.cluster_resources()[TRIAL_SLOTS] == 1.0


def test_export_refuses_a_search_and_names_its_trials(tmp_path):
    with pytest.raises(OrchestratorError, match=r"s3://b/p/tune/asha: a search, not a run; export one of its trials "
                                                r"\(…/tune/asha/trials/<trial-id>"):
        orchestrator.export("s3://b/p/tune/asha", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _stored_jsonl(storage, path: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]


@pytest.mark.slow
def test_local_search_with_asha_leaderboard_plot_best_adapter_resume_and_trial_export(ray_session, s3_storage_uri, tiny_llama_path, faults_file, tmp_path):
    spec = make_spec(
        # One trial at a time: the fault below must meet the first trial past ASHA's first rung.
        s3_storage_uri, name="s", data={"max_length": 24}, scaling={"num_workers": 1},
        train={"max_steps": 30, "eval_every": 10, "eval_batches": 1, "checkpoint_every": 10, "log_every": 10, "max_failures": 0},
        # A grid runs in a fixed order, so a poor trial (lr 1e-5) always meets a better one at ASHA's rungs.
        tune={"name": "asha", "num_samples": 1,
              "space": {"adapter.method": {"grid": ["lora", "lora_fa"]}, "optim.lr": {"grid": [5e-3, 1e-5]}},
              "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 2}},
    )
    # The first trial dies once after step 10 (always past ASHA's first rung: nothing to compare with yet).
    schedule_fault(faults_file, "*_00000", step=10)
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        print(line)

    first = orchestrator.tune(spec, echo=echo)
    statuses = {row["trial"]: row["status"] for row in first.leaderboard}
    assert len(statuses) == 4 and list(statuses.values()).count("error") == 1, first.leaderboard
    # The console told the story: four trials started, the injected fault's trial failed, the best and the leaderboard named.
    failed = next(trial for trial, status in statuses.items() if status == "error")
    assert failed.endswith("_00000")
    assert sorted(line.split()[1] for line in lines if line.startswith("trial ") and " started: " in line) == sorted(statuses)
    failed_lines = [line for line in lines if line.startswith("trial ") and " failed: " in line]
    assert [line.split()[1] for line in failed_lines] == [failed]
    # One line with the cause and where the traceback is (Tune's error.txt).
    assert re.match(rf"trial {failed} failed: InjectedFault: injected fault after step 10 of run \S+_00000 \(worker rank 0\); "
                    r"full error: \S+error.txt \| ", failed_lines[0]), failed_lines
    assert Path(failed_lines[0].split("full error: ")[1].split(" | ")[0]).is_file()
    assert any(line.startswith(f"best trial {first.leaderboard[0]['trial']}: eval_loss ") for line in lines)
    assert lines[-1] == f"leaderboard: {s3_storage_uri}/tune/asha/leaderboard.md"

    resumed_lines: list[str] = []

    def echo_resumed(line: str) -> None:
        resumed_lines.append(line)
        print(line)

    result = orchestrator.tune(spec, resume=True, echo=echo_resumed)
    restarted = [line for line in resumed_lines if line.startswith("trial ") and (" started" in line or " continues from" in line)]
    assert len(restarted) == 1 and "_00000" in restarted[0], "only the interrupted trial runs again"
    rows = result.leaderboard
    assert [row["status"] for row in rows] == ["complete"] * 4
    assert any(row["stopped_early"] for row in rows), "ASHA stopped no trial"
    assert {row["steps"] for row in rows} <= {10, 20, 30} and max(row["steps"] for row in rows) == 30

    # The ranking, checked against what each trial's workers logged (metrics.jsonl), not Tune's records. A
    # stopped trial's workers may train on a little after the search's verdict: only what it saw counts.
    storage = open_storage(s3_storage_uri)
    search_dir = storage.path("tune", "asha")
    logged = {row["trial"]: _stored_jsonl(storage, f"{search_dir}/trials/{row['trial']}/metrics.jsonl") for row in rows}
    seen_best = {row["trial"]: min(m["eval_loss"] for m in logged[row["trial"]] if "eval_loss" in m and m["step"] <= row["steps"])
                 for row in rows}
    for row in rows:
        assert row["best_eval_loss"] == pytest.approx(seen_best[row["trial"]], rel=1e-6), (row, logged[row["trial"]])
        assert row["stopped_early"] or logged[row["trial"]][-1]["step"] == 30
    assert [row["rank"] for row in rows] == [1, 2, 3, 4]
    assert rows[0]["trial"] == min(seen_best, key=seen_best.get)
    table = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{search_dir}/leaderboard.csv").decode())))
    assert len(table) == 4 and all(json.loads(r["params"]).keys() == {"adapter.method", "optim.lr"} for r in table)
    png = storage.read_bytes(f"{search_dir}/curves.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| rank | trial |" in storage.read_bytes(f"{search_dir}/leaderboard.md").decode()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "best"
    storage.download_dir(f"{search_dir}/best/adapter", local)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path), str(local))
    assert model(input_ids=torch.arange(3, 12)[None]).logits.isfinite().all()
    assert json.loads(storage.read_bytes(f"{search_dir}/best/best.json"))["trial"] == rows[0]["trial"]

    # A trial exports like a run, through its URI (docs/tune.md): the same manifest and logits checks.
    from safetensors.torch import load, load_file

    best = next(row for row in rows if not row["stopped_early"])  # a trial ASHA stopped has no final adapter
    trial_uri = f"{s3_storage_uri}/tune/asha/trials/{best['trial']}"
    assert cli.main(["export", trial_uri, "--out", str(tmp_path / "trial-adapter")]) == 0
    exported = load_file(tmp_path / "trial-adapter" / "adapter_model.safetensors")
    stored = load(storage.read_bytes(f"{search_dir}/trials/{best['trial']}/adapter/adapter_model.safetensors"))
    assert exported.keys() == stored.keys() and len(stored) > 0
    assert all(torch.equal(exported[name], stored[name]) for name in stored)
    orchestrator.export(trial_uri, tmp_path / "trial-merged", merged=True, echo=lines.append)
    probe = load(storage.read_bytes(f"{search_dir}/trials/{best['trial']}/probe_logits.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "trial-merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe["input_ids"][None]).logits[0, -4:], probe["logits"].float(),
                                   rtol=1e-4, atol=1e-4)

    with pytest.raises(OrchestratorError, match="already exists"):
        orchestrator.tune(spec, echo=lines.append)


def test_an_optuna_search_draws_per_method_dimensions_and_resumes_after_a_failed_trial(ray_session, s3_storage_uri, faults_file):
    spec = make_spec(
        s3_storage_uri, name="s", data={"max_length": 24}, scaling={"num_workers": 1},
        train={"max_steps": 10, "eval_every": 5, "eval_batches": 1, "checkpoint_every": 5, "log_every": 5, "max_failures": 0},
        tune={"name": "optuna", "num_samples": 3, "search": "optuna", "seed": 1, "scheduler": {"type": "fifo"},
              "space": {"adapter.method": {"choice": ["lora", "vera"]}, "adapter.r@lora": {"choice": [4, 8]},
                        "adapter.r@vera": {"choice": [32, 64]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}}},
    )
    schedule_fault(faults_file, "*", step=5)  # the first trial to reach step 5 fails, once; no restarts within the search
    try:
        first = orchestrator.tune(spec, echo=print)
    finally:  # a pattern this wide must not outlive the test
        faults_file.write_text(json.dumps({k: v for k, v in json.loads(faults_file.read_text() or "{}").items() if k != "*"}))
    statuses = {row["trial"]: row["status"] for row in first.leaderboard}
    assert len(statuses) == 3 and list(statuses.values()).count("error") == 1, statuses
    params = {row["trial"]: row["params"] for row in first.leaderboard}
    for values in params.values():  # only the drawn method's own dimensions
        method = values["adapter.method"]
        assert set(values) == {"adapter.method", "optim.lr", f"adapter.r@{method}"}, values

    resumed = orchestrator.tune(spec, resume=True, echo=print)
    assert [row["status"] for row in resumed.leaderboard] == ["complete"] * 3
    assert {row["trial"]: row["params"] for row in resumed.leaderboard} == params  # the failed trial ran again as drawn


@pytest.mark.slow
def test_pbt_continues_a_poor_trial_from_a_good_ones_checkpoint_with_perturbed_rates(ray_session, s3_storage_uri, faults_file):
    spec = make_spec(
        # Half a CPU per worker: both trials of the population train at once on the tests' 2-CPU runtime.
        s3_storage_uri, name="s", data={"max_length": 24}, scaling={"num_workers": 1, "cpus_per_worker": 0.5},
        optim={"scheduler": "constant"},
        train={"max_steps": 20, "eval_every": 5, "eval_batches": 1, "checkpoint_every": 5, "log_every": 5, "max_failures": 0},
        tune={"name": "pbt", "num_samples": 1, "seed": 0, "space": {"optim.lr": {"grid": [1e-5, 5e-3]}},
              "scheduler": {"type": "pbt", "perturbation_interval": 5, "quantile_fraction": 0.5, "resample_probability": 0}},
    )
    storage = open_storage(s3_storage_uri)
    search_dir = storage.path("tune", "pbt")
    # Ray's PBT copies only from a checkpoint it kept when that trial reported while both trials had results, and
    # acts only on the trial reporting. So each trial waits after step 5 until both have reported step 5, however far
    # apart they started: from step 10 on, the poor one (lr 1e-5) meets the good one's kept checkpoint.
    suffixes = ("_00000", "_00001")
    for suffix in suffixes:
        schedule_fault(faults_file, f"*{suffix}", step=5, pause_s=240)
    both_at_5 = lambda: min(_reported_steps(storage, f"{search_dir}/trials", suffix) for suffix in suffixes) >= 5  # noqa: E731
    threading.Thread(target=_release_when, args=(faults_file, both_at_5), daemon=True).start()
    try:
        result = orchestrator.tune(spec, echo=print)
    finally:  # patterns this wide must not outlive the test
        faults_file.write_text(json.dumps({k: v for k, v in json.loads(faults_file.read_text() or "{}").items()
                                           if k not in {f"*{suffix}" for suffix in suffixes}}))
        Path(f"{faults_file}.release").touch()  # ends the release thread; the next schedule_fault clears it
    rows = result.leaderboard
    assert [row["status"] for row in rows] == ["complete"] * 2 and all(row["steps"] == 20 for row in rows), rows
    exploited = [row for row in rows if row["mutations"]]
    assert len(exploited) == 1, rows  # the poor trial (lr 1e-5) copies the good one at least once
    trial = exploited[0]
    mutation = trial["mutations"][0]
    good = next(row["trial"] for row in rows if row is not trial)
    assert mutation["from_trial"] == good and mutation["before"] == {"optim.lr": 1e-5}, mutation
    assert mutation["after"]["optim.lr"] in (1e-5, 5e-3) and mutation["step"] % 5 == 0 and 5 <= mutation["step"] < 20
    trial_dir = f"{search_dir}/trials/{trial['trial']}"
    last = trial["mutations"][-1]
    # The trial went on from the copied checkpoint (not from its own, nor from scratch), at the perturbed rate.
    summary = json.loads(storage.read_bytes(f"{trial_dir}/summary.json"))
    assert summary["resumed_from_step"] == last["step"], (summary, trial["mutations"])
    logged = _stored_jsonl(storage, f"{trial_dir}/metrics.jsonl")
    copied = _stored_jsonl(storage, f"{search_dir}/trials/{last['from_trial']}/metrics.jsonl")
    assert [m for m in logged if m["step"] <= last["step"]] == [m for m in copied if m["step"] <= last["step"]]
    after = [m for m in logged if m["step"] > last["step"]]
    assert after and all(m["lr"] == pytest.approx(last["after"]["optim.lr"]) for m in after), after
    assert json.loads(storage.read_bytes(f"{trial_dir}/params.json")) == last["after"] == trial["params"]
    # Steps trained, restarts included: the good trial's 20; the poor one's own steps, then 20 - step from the copy.
    assert next(row["trained_steps"] for row in rows if row is not trial) == 20
    assert trial["trained_steps"] > 20 - last["step"], trial
    assert yaml.safe_load(storage.read_bytes(f"{trial_dir}/spec.yaml"))["optim"]["lr"] == last["after"]["optim.lr"]
    table = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{search_dir}/leaderboard.csv").decode())))
    assert {r["trial"]: json.loads(r["mutations"]) for r in table}[trial["trial"]] == trial["mutations"]
    assert "## PBT mutations" in storage.read_bytes(f"{search_dir}/leaderboard.md").decode()


def _reported_steps(storage, trials_dir: str, suffix: str) -> int:
    """The last step the trial whose id ends with `suffix` reported to its scheduler (0 before its first report)."""
    try:
        logs = [name for name in storage.list_files(trials_dir) if name.endswith("/reported.jsonl") and name.split("/")[0].endswith(suffix)]
        return max((entry["step"] for name in logs for entry in _stored_jsonl(storage, f"{trials_dir}/{name}")), default=0)
    except (FileNotFoundError, OSError):
        return 0


def _release_when(faults_file: Path, condition, timeout_s: float = 240) -> None:
    """Ends the scheduled pauses (orchestrator.train.faults) once `condition()` holds; gives up once they are over."""
    released, deadline = Path(f"{faults_file}.release"), time.monotonic() + timeout_s
    while time.monotonic() < deadline and not released.exists() and not condition():
        time.sleep(0.5)
    released.touch()


def test_a_result_belongs_to_the_trial_whose_directory_it_is_in():
    # PBT hands a trial it exploited the metrics of the trial it copied, trial_id included, until it reports again.
    from types import SimpleNamespace

    from orchestrator.results.leaderboard import trial_id_of

    copied = SimpleNamespace(path="b/p/tune/pbt/tuner/run_trial_de908_00000_0_p0=0.0000_2026-12-07_08-26-15",
                             metrics={"trial_id": "de908_00001"})
    assert trial_id_of(copied) == "de908_00000"


def test_pbt_neither_exploits_nor_offers_a_runs_last_step():
    # A trial that copied a finished trial's last checkpoint would train nothing and show the other's result as its own.
    from ray.tune.schedulers import TrialScheduler

    from orchestrator.search.schedulers import build_scheduler

    spec = validate_spec(with_space({"optim.lr": {"grid": [1e-5, 5e-3]}}, scheduler={"type": "pbt", "perturbation_interval": 10}))
    scheduler = build_scheduler(spec, {"p0": "optim.lr"})
    scheduler.set_search_properties("eval_loss", "min", config={})  # as the Tuner does
    unknown_trial = object()  # Ray's PBT would look its state up, and fail, for any result before the last step
    assert scheduler.on_trial_result(None, unknown_trial, {"step": 20, "eval_loss": 1.0}) == TrialScheduler.CONTINUE
    with pytest.raises(KeyError):
        scheduler.on_trial_result(None, unknown_trial, {"step": 15, "eval_loss": 1.0})


def test_hyperband_is_rays_synchronous_hyperband_over_the_step():
    # Its pausing and continuing is sha's (test_sha_pauses_every_trial_…): the same pointers, gate and resume.
    from ray.tune.schedulers import HyperBandScheduler

    from orchestrator.search.schedulers import build_scheduler

    spec = validate_spec(with_space({"optim.lr": {"grid": [1e-5, 5e-3]}}, scheduler={"type": "hyperband", "reduction_factor": 4}))
    scheduler = build_scheduler(spec, {"p0": "optim.lr"})
    assert isinstance(scheduler, HyperBandScheduler) and scheduler._eta == 4 and scheduler._max_t_attr == 20


@pytest.mark.slow
def test_sha_pauses_every_trial_at_each_rung_and_continues_exactly_the_best_from_their_own_checkpoints(ray_session, s3_storage_uri):
    spec = make_spec(
        # Half a CPU per worker: two trials train at once on the tests' 2 CPUs. No checkpoint_every: sha's trials
        # checkpoint at its rungs.
        s3_storage_uri, name="s", data={"max_length": 24}, scaling={"num_workers": 1, "cpus_per_worker": 0.5},
        train={"max_steps": 20, "eval_every": 5, "eval_batches": 1, "checkpoint_every": 0, "log_every": 5, "max_failures": 0},
        tune={"name": "sha", "num_samples": 1, "seed": 0, "search": "grid",
              "space": {"optim.lr": {"choice": [1e-5, 5e-3, 1e-3, 1e-4]}}, "scheduler": {"reduction_factor": 2}},
    )
    assert spec.tune.scheduler.type == "sha"  # the default for a grid
    rows = orchestrator.tune(spec, echo=print).leaderboard
    assert len(rows) == 4 and all(row["status"] == "complete" for row in rows), rows
    # Rungs at 5 and 10: 4 trials → 2 → 1, which trains to the end. 40 trial-steps against the grid's 80.
    assert sorted(row["steps"] for row in rows) == [5, 5, 10, 20], rows
    assert all(row["trained_steps"] == row["steps"] for row in rows), rows  # no step trained twice
    storage = open_storage(s3_storage_uri)
    trials = storage.path("tune", "sha", "trials")
    eval_at = {row["trial"]: {m["step"]: m["eval_loss"] for m in _stored_jsonl(storage, f"{trials}/{row['trial']}/metrics.jsonl")
                              if "eval_loss" in m} for row in rows}
    for rung, keep in ((5, 2), (10, 1)):
        reached = [row["trial"] for row in rows if row["steps"] >= rung]
        went_on = {row["trial"] for row in rows if row["steps"] > rung}
        assert went_on == set(sorted(reached, key=lambda trial: eval_at[trial][rung])[:keep]), (rung, eval_at)
    # Every trial that reaches a rung before the rung is complete pauses there (only the last to arrive does not), so
    # at least one of the two that went past step 5 was paused and went on from its own step-5 checkpoint.
    resumed = {row["trial"]: {e["resumed_from_step"] for e in _stored_jsonl(storage, f"{trials}/{row['trial']}/reported.jsonl")}
               for row in rows}
    assert any(5 in resumed[row["trial"]] for row in rows if row["steps"] > 5), resumed
    assert set().union(*resumed.values()) <= {0, 5, 10}, resumed
