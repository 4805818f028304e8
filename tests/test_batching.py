"""The global batch across worker counts (orchestrator/batching.py): how any count splits it, the spec's check of an
elastic range, and what a resume on another worker count keeps or refuses (launch/run.py's choose_run)."""

from __future__ import annotations

import pytest

from orchestrator.batching import split_global_batch
from orchestrator.errors import JobSpecError
from orchestrator.launch.run import choose_run
from orchestrator.storage.fs import open_storage
from orchestrator.storage.layout import RunLayout
from orchestrator.train.loop import split_for_world
from tests.helpers import make_spec, training_metrics, write_run


@pytest.mark.parametrize("total, workers, preferred, expected", [
    (16, 2, 8, (8, 1)), (16, 1, 8, (8, 2)), (16, 4, 8, (4, 1)), (12, 2, 2, (2, 3)), (12, 3, 2, (2, 2)),
    (12, 2, 4, (3, 2)),  # 4 does not divide a worker's share of 6: the largest batch that does
    (16, 3, 8, None), (7, 2, 1, None),
])
def test_split_keeps_the_global_batch_and_prefers_the_per_worker_batch(total, workers, preferred, expected):
    split = split_global_batch(total, workers, preferred)
    assert split == expected
    if split is not None:
        assert split[0] * split[1] * workers == total


def test_workers_take_their_share_from_the_run_s_global_batch():
    spec = make_spec(train={"batch_size": 8, "grad_accum": 1}, scaling={"num_workers": 4})
    config = {"deepspeed": {"train_batch_size": 32, "zero_optimization": {"stage": 2}}, "global_batch": 32}
    batch, accum, ds = split_for_world(spec, config, 2)
    assert (batch, accum) == (8, 2)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["zero_optimization"] == {"stage": 2}


@pytest.mark.parametrize("scaling, train, message", [
    ({"num_workers": 4, "min_workers": 2}, {"batch_size": 4}, "cannot be split evenly over 3 workers; worker counts that keep it: 1, 2, 4, 8"),
    ({"num_workers": 2, "min_workers": 3}, {}, "scaling.min_workers: 3 is more than num_workers (2)"),
])
def test_an_elastic_range_that_cannot_keep_the_global_batch_is_refused(scaling, train, message):
    with pytest.raises(JobSpecError) as error:
        make_spec(train=train, scaling=scaling)
    assert "scaling.min_workers" in str(error.value) and message in str(error.value)


def test_an_elastic_range_that_keeps_it_is_accepted():
    spec = make_spec(train={"batch_size": 2, "grad_accum": 2}, scaling={"num_workers": 3, "min_workers": 2})
    assert spec.scaling.worker_range == (2, 3)


@pytest.fixture
def stored_run(tmp_path):
    storage = open_storage(f"file://{tmp_path}/store")
    spec = make_spec(f"file://{tmp_path}/store", train={"batch_size": 8, "grad_accum": 1}, scaling={"num_workers": 2})
    write_run(storage, RunLayout(storage, spec.name, "r1").run_dir, spec, training_metrics(12, 6, 2.0), complete=False)
    return storage, spec


def test_a_resume_on_fewer_workers_keeps_the_global_batch(stored_run):
    storage, spec = stored_run
    lines = []
    fewer = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"num_workers": 1})})
    layout, exists, kept = choose_run(storage, fewer, "r1", True, lines.append)
    assert exists and (kept.train.batch_size, kept.train.grad_accum, kept.scaling.num_workers) == (8, 2, 1)
    assert lines == ["run r1 trained on 2 workers: on 1, batch_size 8 × grad_accum 2 keeps its global batch of 16"]
    more = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"num_workers": 4})})
    kept = choose_run(storage, more, "r1", True, lines.append)[2]
    assert (kept.train.batch_size, kept.train.grad_accum) == (4, 1)


@pytest.mark.parametrize("workers, train, message", [
    (3, {}, "scaling.num_workers: run r1: the global batch 16 (batch_size × grad_accum × num_workers) cannot be split evenly over 3 workers"),
    (2, {"grad_accum": 2}, "train.grad_accum: changes run r1's global batch (16 there, 32 now); start a new run instead"),
    (1, {"batch_size": 4}, "train.batch_size: changes run r1's global batch (16 there, 4 now); start a new run instead"),
])
def test_a_resume_that_cannot_keep_the_global_batch_is_refused(stored_run, workers, train, message):
    storage, spec = stored_run
    changed = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"num_workers": workers}),
                                      "train": spec.train.model_copy(update=train)})
    with pytest.raises(JobSpecError) as error:
        choose_run(storage, changed, "r1", True, print)
    assert str(error.value).startswith(message), str(error.value)


def test_plan_shows_an_elastic_range_and_a_search_refuses_one():
    from orchestrator.launch.tune import tune
    from orchestrator.plan import build_plan, cluster_needs
    from orchestrator.spec import load_spec
    from tests.helpers import REPO

    spec = make_spec(train={"batch_size": 2, "grad_accum": 2}, scaling={"num_workers": 3, "min_workers": 2})
    assert build_plan(spec).to_dict()["workers"] == "2-3 (elastic)"
    assert cluster_needs(spec, spec.scaling.worker_range[0]) == {"CPU": 2.0}
    search = load_spec(str(REPO / "jobs" / "local-search.yaml"), ["scaling.num_workers=2", "scaling.min_workers=1"])
    with pytest.raises(JobSpecError, match=r"^scaling\.min_workers: elastic training is for orchestrator run"):
        tune(search)
