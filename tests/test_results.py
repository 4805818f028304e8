"""`orchestrator runs / show / compare` over runs and searches in a real S3 server (SeaweedFS).

The fast tests write run folders exactly as a run leaves them (spec.yaml from a real JobSpec, metrics.jsonl,
checkpoints with manifests, adapter/, summary.json, manifest.json last); the slow one trains two real runs.
"""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import timedelta

import pytest
from PIL import Image

import orchestrator
from orchestrator.cli import main
from orchestrator.errors import OrchestratorError, StorageError
from orchestrator.results import report, tracking
from orchestrator.results.curves import COMPARISON_FIGURE_INCHES, DPI, RUN_FIGURE_INCHES
from orchestrator.results.uri import split_result_uri
from orchestrator.storage.fs import open_storage
from orchestrator.storage.manifest import build_manifest, sha256_bytes, write_manifest
from tests.helpers import make_spec, training_metrics, write_run

RUN_PNG = (RUN_FIGURE_INCHES[0] * DPI, RUN_FIGURE_INCHES[1] * DPI)
COMPARISON_PNG = (COMPARISON_FIGURE_INCHES[0] * DPI, COMPARISON_FIGURE_INCHES[1] * DPI)


def write_search(storage, search: str, trials: dict[str, tuple], *, finished: bool) -> int:
    """tune/<search>/ with its trials (trial id → (spec, metrics, complete, params)) and, when finished,
    the leaderboard, curves and manifest that `publish` leaves."""
    written = sum(write_run(storage, f"tune/{search}/trials/{trial}", spec, metrics, complete=complete, params=params)
                  for trial, (spec, metrics, complete, params) in trials.items())
    storage.write_bytes(storage.path("tune", search, "tuner", "tuner.pkl"), b"tune state")
    written += len(b"tune state")
    if finished:
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["rank", "trial", "params", "best_eval_loss", "steps", "stopped_early", "status", "wall_s"])
        for rank, (trial, (spec, metrics, complete, params)) in enumerate(trials.items(), 1):
            writer.writerow([rank, trial, json.dumps(params), 1.0, metrics[-1]["step"], not complete, "complete", 10.0])
        published = {"leaderboard.csv": table.getvalue().encode(), "curves.png": report.comparison_png("published", [])}
        for name, data in published.items():
            storage.write_bytes(storage.path("tune", search, name), data)
            written += len(data)
        write_manifest(storage, storage.path("tune", search), build_manifest({n: sha256_bytes(d) for n, d in published.items()}))
        written += len(storage.read_bytes(storage.path("tune", search, "manifest.json")))
    return written


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.verify()
    return image.size


def write_examples(uri: str, pause: float):
    """Two runs and a finished search, oldest first, `pause` seconds apart; returns (uri, storage, {path: bytes})."""
    storage = open_storage(uri)
    sizes = {}
    sizes["runs/it/20261101-100000-aaaa"] = write_run(
        storage, "runs/it/20261101-100000-aaaa", make_spec(uri), training_metrics(12, 6, start_loss=5.0))
    time.sleep(pause)
    plus = make_spec(uri, name="plus", optim={"lora_plus_ratio": 16},
                     adapter={"method": "delta_lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "start_step": 2})
    sizes["runs/plus/20261102-100000-bbbb"] = write_run(
        storage, "runs/plus/20261102-100000-bbbb", plus, training_metrics(12, 6, start_loss=4.0)[:2], complete=False, checkpoints=(6,))
    time.sleep(pause)
    trials = {
        "t0001": (make_spec(uri, adapter={"r": 16}), training_metrics(12, 6, start_loss=4.5), True, {"adapter.r": 16}),
        "t0002": (make_spec(uri, adapter={"r": 4}), training_metrics(12, 6, start_loss=4.8)[:2], False, {"adapter.r": 4}),
    }
    sizes["tune/sweep"] = write_search(storage, "sweep", trials, finished=True)
    return uri, storage, sizes


@pytest.fixture
def stored(s3_storage_uri):
    """The examples written one second apart, for tests of the newest-first order (S3 times have 1 s resolution)."""
    return write_examples(s3_storage_uri, pause=1.1)


@pytest.fixture
def examples(s3_storage_uri):
    return write_examples(s3_storage_uri, pause=0)


def test_runs_lists_runs_and_searches_newest_first_with_their_settings(stored):
    uri, _, sizes = stored
    records = orchestrator.runs(uri)
    assert [r.path for r in records] == ["tune/sweep", "runs/plus/20261102-100000-bbbb", "runs/it/20261101-100000-aaaa"]
    rows = {r.path: report.overview_row(r) for r in records}
    assert rows["runs/it/20261101-100000-aaaa"] | {"when": None} == {
        "name": "it", "run": "runs/it/20261101-100000-aaaa", "method": "lora", "r": "8", "lora+": "–", "steps": "12/12",
        "best eval loss": f"{5.1 - 0.04 * 12:.4f}", "status": "complete", "when": None,
        "size": report._size(sizes["runs/it/20261101-100000-aaaa"])}
    assert rows["runs/plus/20261102-100000-bbbb"]["method"] == "delta_lora"
    assert (rows["runs/plus/20261102-100000-bbbb"]["r"], rows["runs/plus/20261102-100000-bbbb"]["lora+"]) == ("4", "16")
    assert rows["runs/plus/20261102-100000-bbbb"]["steps"] == "6/12"
    assert rows["runs/plus/20261102-100000-bbbb"]["status"] == "incomplete"
    search = rows["tune/sweep"]
    assert (search["name"], search["r"], search["steps"], search["status"]) == ("sweep", "4–16", "2 trials", "complete")
    assert search["best eval loss"] == f"{4.6 - 0.04 * 12:.4f}"
    assert {r.path: r.size for r in records} == sizes


def test_runs_filters_by_job_method_and_age(stored):
    uri, _, _ = stored
    assert [r.path for r in orchestrator.runs(uri, job="plus")] == ["runs/plus/20261102-100000-bbbb"]
    # A search over the job counts as one of its results.
    assert [r.path for r in orchestrator.runs(uri, job="it")] == ["tune/sweep", "runs/it/20261101-100000-aaaa"]
    assert [r.path for r in orchestrator.runs(uri, method="delta_lora")] == ["runs/plus/20261102-100000-bbbb"]
    middle = orchestrator.runs(uri, job="plus")[0].modified
    assert [r.path for r in orchestrator.runs(uri, since=middle.isoformat())] == ["tune/sweep", "runs/plus/20261102-100000-bbbb"]
    assert len(orchestrator.runs(uri, since="1h")) == 3
    assert orchestrator.runs(uri, since=(middle + timedelta(days=1)).date().isoformat()) == []


def test_runs_cli_prints_a_table(stored, capsys):
    uri, _, _ = stored
    assert main(["runs", uri, "--method", "lora"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "RUN", "METHOD", "R", "LORA+", "STEPS", "BEST", "EVAL", "LOSS", "STATUS", "WHEN", "SIZE"]
    assert lines[1].split()[:7] == ["sweep", "tune/sweep", "lora", "4–16", "–", "2", "trials"]
    assert lines[2].split()[:8] == ["it", "runs/it/20261101-100000-aaaa", "lora", "8", "–", "12/12", "4.6200", "complete"]
    assert lines[3] == f"(2 in {uri}; `orchestrator show RUN` for one)"


def test_show_writes_the_loss_curves_next_to_the_run(examples, tmp_path, capsys):
    uri, storage, _ = examples
    out = tmp_path / "curves.png"
    assert main(["show", f"{uri}/runs/it/20261101-100000-aaaa", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert png_size(out.read_bytes()) == RUN_PNG
    assert storage.read_bytes(storage.path("runs/it/20261101-100000-aaaa/curves.png")) == out.read_bytes()
    assert f"curves  {uri}/runs/it/20261101-100000-aaaa/curves.png" in text
    assert "trainable  65,536 of 427,648 parameters (15.325%)" in text
    assert f"adapter  {uri}/runs/it/20261101-100000-aaaa/adapter" in text
    assert f"best  eval_loss {5.1 - 0.04 * 12:.4f} at step 12 · loss {5.0 - 0.05 * 12:.4f} at step 12" in text
    assert "steps  12/12 · wall 0:01:23" in text
    assert "method  lora · r 8 · alpha 16 · lr 0.003 · ZeRO-2 · 2 workers" in text
    assert "packages  python " in text and " torch " in text
    assert "spec:\n  name: it\n  model:\n    path: builtin:tiny-llama" in text


def test_show_an_unfinished_run_points_at_its_last_checkpoint(examples, tmp_path):
    uri, _, _ = examples
    shown = orchestrator.show("runs/plus/20261102-100000-bbbb", storage_uri=uri, out=tmp_path / "p.png")
    details = dict(report.run_details(shown))
    assert details["run"] == f"{uri}/runs/plus/20261102-100000-bbbb  (incomplete)"
    assert details["adapter"] == f"{uri}/runs/plus/20261102-100000-bbbb/checkpoints/step-00000006/adapter"
    assert details["trainable"].startswith("recorded when the run completes")
    assert "torch" in shown.packages, "versions come from the checkpoint's manifest until the run completes"
    assert png_size(shown.curves_path.read_bytes()) == RUN_PNG


def test_show_a_search_gives_its_leaderboard_and_published_curves(examples, tmp_path, capsys):
    uri, storage, _ = examples
    assert main(["show", "tune/sweep", "--storage", uri, "--out", str(tmp_path / "s.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"    search  {uri}/tune/sweep  (complete, 2 trials)" in lines
    assert f"      best  t0001: eval_loss {4.6 - 0.04 * 12:.4f} at step 12" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("RANK"))
    assert [line.split()[1] for line in lines[header + 1:]] == ["tune/sweep/trials/t0001", "tune/sweep/trials/t0002"]
    assert lines[header + 1].endswith("complete") and lines[header + 2].endswith("stopped early")
    assert (tmp_path / "s.png").read_bytes() == storage.read_bytes(storage.path("tune/sweep/curves.png"))


def test_compare_puts_runs_and_a_search_side_by_side(examples, tmp_path, capsys):
    uri, _, _ = examples
    out = tmp_path / "cmp.png"
    assert main(["compare", "runs/it/20261101-100000-aaaa", "tune/sweep", "--storage", uri, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert png_size(out.read_bytes()) == COMPARISON_PNG
    assert lines[-1] == f"plot: {out}"
    columns = lines[0].split()
    assert columns[:4] == ["RUN", "METHOD", "R", "LORA+"] and "ADAPTER.ALPHA" not in columns
    assert [line.split()[0] for line in lines[1:-1]] == [
        "runs/it/20261101-100000-aaaa", "tune/sweep/trials/t0001", "tune/sweep/trials/t0002"]
    assert [line.split()[2] for line in lines[1:-1]] == ["8", "16", "4"]


def test_compare_names_the_fields_that_differ(examples, tmp_path):
    uri, _, _ = examples
    comparison = orchestrator.compare([f"{uri}/runs/it/20261101-100000-aaaa", f"{uri}/runs/plus/20261102-100000-bbbb"],
                                      out=tmp_path / "c.png")
    assert {"adapter.alpha", "adapter.start_step"} <= set(comparison.differing)
    assert "name" not in comparison.differing and "adapter.r" not in comparison.differing  # r has its own column
    rows = report.comparison_rows(comparison)
    assert (rows[0]["adapter.alpha"], rows[1]["adapter.alpha"]) == ("16", "8")
    assert rows[1]["lora+"] == "16" and rows[0]["trainable"] == "65,536"


@pytest.mark.parametrize("argv, message", [
    (["show", "runs/it"], "runs/it: not a run or search"),
    (["show", "{uri}/runs/it/no-such-run"], "{uri}/runs/it/no-such-run: no run there (`orchestrator runs {uri}` lists what is)"),
    (["show", "tune/nothing", "--storage", "{uri}"], "{uri}/tune/nothing: no search there"),
    (["compare", "{uri}/runs/it/20261101-100000-aaaa"], "compare: needs at least two runs (got 1)"),
    (["runs", "{uri}", "--since", "yesterday"], "--since: 'yesterday' is neither an age"),
    (["runs", "s3://no-such-bucket-here"], "storage s3://no-such-bucket-here: bucket or path does not exist"),
    (["show", "{uri}/runs/it/20261101-100000-aaaa", "--out", "plot.jpg"], "--out plot.jpg: the plot is a PNG"),
], ids=["not-a-run", "unknown-run", "unknown-search", "compare-one", "bad-since", "no-bucket", "not-png"])
def test_mistakes_give_one_line_and_exit_2(examples, capsys, argv, message):
    uri, _, _ = examples
    assert main([arg.format(uri=uri) for arg in argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: " + message.format(uri=uri)) and "\n" not in error


def test_unreachable_storage_is_one_line(object_store, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="storage s3://orchestrator-test: cannot reach the object store"):
        orchestrator.runs("s3://orchestrator-test")


def test_default_storage_is_local_modes_embedded_store(object_store, tmp_path, monkeypatch):
    from orchestrator.storage.objectstore import embedded_store

    # Local mode: no endpoint configured, so s3://orchestrator means the embedded store, in its data dir.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("ORCHESTRATOR_STORE_DIR", str(tmp_path / "store"))
    with embedded_store(print):
        write_run(open_storage("s3://orchestrator"), "runs/it/20261103-100000-cccc", make_spec("s3://orchestrator"),
                  training_metrics(12, 6, start_loss=5.0))
    notices = []
    records = orchestrator.runs(echo=notices.append)  # the store is stopped: runs starts it again
    assert [r.uri for r in records] == ["s3://orchestrator/runs/it/20261103-100000-cccc"]
    assert notices and notices[0].startswith("embedded object store: http://127.0.0.1:")


def test_split_result_uri_takes_uris_and_the_paths_runs_prints():
    assert split_result_uri("s3://b/pre/fix/runs/job/id/") == ("s3://b/pre/fix", "runs/job/id")
    assert split_result_uri("file:///data/tune/s/trials/t1") == ("file:///data", "tune/s/trials/t1")
    assert split_result_uri("tune/s") == ("s3://orchestrator", "tune/s")
    assert split_result_uri("runs/job/id", "s3://b/p/") == ("s3://b/p", "runs/job/id")
    with pytest.raises(OrchestratorError, match="not a run or search"):
        split_result_uri("s3://b/runs/job")


def test_runs_reads_a_file_storage_too(tmp_path):
    storage = open_storage(f"file://{tmp_path}")
    size = write_run(storage, "runs/it/20261104-100000-dddd", make_spec(f"file://{tmp_path}"), training_metrics(12, 6, 5.0))
    [record] = orchestrator.runs(f"file://{tmp_path}")
    assert (record.path, record.status, record.size, record.steps) == ("runs/it/20261104-100000-dddd", "complete", size, 12)


def test_open_needs_a_desktop(tmp_path, monkeypatch):
    plot = tmp_path / "p.png"
    plot.write_bytes(b"png")
    said = []
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    assert report.open_plot(plot, said.append) is False
    assert said == [f"--open: no desktop here (DISPLAY is not set); the plot is {plot}"]
    opened = []
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    assert report.open_plot(plot, said.append) is True
    assert opened == [plot.resolve().as_uri()]


@pytest.mark.slow
def test_real_runs_feed_runs_show_and_compare(ray_session, s3_storage_uri, tmp_path, capsys):
    first = orchestrator.run(make_spec(s3_storage_uri), run_id="first", echo=print)
    # The second run is also tracked in MLflow: logged when it ends, with the values it stored.
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    second = orchestrator.run(make_spec(s3_storage_uri, adapter={"r": 4}, optim={"lora_plus_ratio": 8},
                                        tracking={"mlflow": {"tracking_uri": mlflow_uri}}), run_id="second", echo=print)
    records = orchestrator.runs(s3_storage_uri, job="it")
    assert [r.uri for r in records] == [second.run_uri, first.run_uri]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    [logged] = client.search_runs([client.get_experiment_by_name("it").experiment_id])
    assert logged.info.status == "FINISHED" and logged.data.tags[tracking.RUN_URI_TAG] == second.run_uri
    assert sorted((m.step, m.value) for m in client.get_metric_history(logged.info.run_id, "loss")) == [
        (m["step"], pytest.approx(m["loss"])) for m in records[0].metrics]
    rows = [report.overview_row(r) for r in records]
    assert [(row["r"], row["lora+"], row["steps"], row["status"]) for row in rows] == [("4", "8", "12/12", "complete"),
                                                                                          ("8", "–", "12/12", "complete")]
    best = min(m["eval_loss"] for m in records[0].metrics if "eval_loss" in m)
    assert rows[0]["best eval loss"] == f"{best:.4f}"
    shown = orchestrator.show(first.run_uri, out=tmp_path / "first.png")
    assert png_size(shown.curves_path.read_bytes()) == RUN_PNG
    assert shown.record.summary["trainable_parameters"] == first.summary["trainable_parameters"]
    assert shown.packages["ray"].startswith("2.60") and shown.record.adapter_uri == first.adapter_uri
    assert main(["compare", first.run_uri, second.run_uri, "--out", str(tmp_path / "c.png")]) == 0
    assert png_size((tmp_path / "c.png").read_bytes()) == COMPARISON_PNG
    table = capsys.readouterr().out
    assert "runs/it/first" in table and "runs/it/second" in table


def test_the_names_runs_and_show_print_are_what_show_compare_and_export_take(examples, tmp_path, capsys):
    uri, storage, _ = examples
    assert main(["runs", uri]) == 0
    runs_names = [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:-1]]  # the RUN column
    assert {"tune/sweep", "runs/it/20261101-100000-aaaa"} <= set(runs_names)
    assert main(["show", "tune/sweep", "--storage", uri, "--out", str(tmp_path / "s.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("RANK"))
    trial = lines[header + 1].split()[1]  # the leaderboard's RUN column: the best trial
    assert trial == "tune/sweep/trials/t0001"
    for name in ("runs/it/20261101-100000-aaaa", trial):
        for given in (name, f"{uri}/{name}"):  # relative to --storage, and as the full URI that show prints
            assert main(["show", given, "--storage", uri, "--out", str(tmp_path / "one.png")]) == 0
            assert f"{uri}/{name}  (complete)" in capsys.readouterr().out
        out = tmp_path / name.replace("/", "-")
        assert orchestrator.export(name, out, storage_uri=uri, echo=lambda line: None) == out
        assert main(["export", f"{uri}/{name}", "--out", str(out / "again")]) == 0
        stored = storage.read_bytes(storage.path(name, "adapter", "adapter_model.safetensors"))
        assert (out / "adapter_model.safetensors").read_bytes() == (out / "again" / "adapter_model.safetensors").read_bytes() == stored
    capsys.readouterr()
    assert main(["compare", "runs/it/20261101-100000-aaaa", trial, "--storage", uri, "--out", str(tmp_path / "c.png")]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:-1]] == ["runs/it/20261101-100000-aaaa", trial]
