"""The command line: parses arguments, calls the Python API (`import orchestrator`) and prints.
User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import sys

import orchestrator
from orchestrator.errors import OrchestratorError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Fine-tune parameter-efficient adapters (LoRA, LoRA-FA, VeRA, Delta-LoRA, LoRA+) with Ray Train "
                    "and DeepSpeed; checkpoints, metrics and adapters go to object storage.",
        epilog="Start with `orchestrator run --local jobs/local-smoke.yaml`; `orchestrator COMMAND --help` for one command.")
    commands = parser.add_subparsers(dest="command", required=True)

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("job", help="job spec YAML")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                         help="override a spec field, e.g. --set train.max_steps=50 (repeatable)")
        return sub

    job_command("validate", "validate a job spec")
    plan = job_command("plan", "show the resolved DeepSpeed config, resources and trainable parameters (no Ray)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    run = job_command("run", "run a fine-tuning job")
    run.add_argument("--local", action="store_true", help="single-node test mode: start Ray (and an S3 server) in-process")
    run.add_argument("--run-id", help="name the run; starting an existing run again resumes it")
    run.add_argument("--resume", action="store_true", help="resume the latest run of this job (or --run-id)")
    tune = job_command("tune", "search hyperparameters with Ray Tune (the job's tune section)")
    tune.add_argument("--local", action="store_true", help="single-node mode: start Ray (and an S3 server) in-process")
    tune.add_argument("--resume", action="store_true", help="resume the interrupted search; finished trials are kept")
    export = commands.add_parser("export", help="write a finished run's (or search trial's) adapter (PEFT format) or merged model to a directory")
    export.add_argument("run_uri", help="s3://bucket[/prefix]/runs/<job>/<run-id> (as printed by run) or "
                        "s3://bucket[/prefix]/tune/<search>/trials/<trial-id> (as the leaderboard lists it)")
    export.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    export.add_argument("--merged", action="store_true", help="merge the adapter into the base model (save_pretrained)")
    export.add_argument("--endpoint-url", help="S3 endpoint (else AWS_ENDPOINT_URL; local-mode runs use the embedded store)")
    schema = commands.add_parser("schema", help="print the job spec's JSON Schema (for editors; see docs/reference.md)")
    schema.add_argument("--markdown", action="store_true", help="print the Markdown reference (docs/reference.md) instead")
    store = commands.add_parser("store", help="serve the embedded S3 store in the foreground and print its settings "
                                              "(storage for a head from cluster/local.sh)")
    store.add_argument("--dir", help="where it keeps its data (default ~/.cache/orchestrator/store)")
    up = commands.add_parser("up", help="keep a local Ray and the embedded S3 store running in the background for "
                                        "`run --local` (a warm start); `orchestrator down` stops them")
    up.add_argument("--idle-timeout", type=float, default=30.0, metavar="MINUTES",
                    help="stop after this many minutes without a run (default 30)")
    up.add_argument("--cpus", type=int, help="CPUs Ray offers (default: all of this machine's)")
    commands.add_parser("down", help="stop what `orchestrator up` started (the store's data is kept)")
    _cluster_commands(commands, job_command)
    _results_commands(commands)
    return parser


def _results_commands(commands) -> None:
    def reading(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--endpoint-url", help="S3 endpoint (else AWS_ENDPOINT_URL; s3://orchestrator uses the embedded store)")
        return sub

    def naming_runs(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--storage", metavar="URI", help="where relative RUN paths are (default s3://orchestrator, local mode's store)")
        sub.add_argument("--out", metavar="FILE.png", help="where to save the plot (default ~/.cache/orchestrator/plots/)")
        return reading(sub)

    runs = reading(commands.add_parser("runs", help="runs and searches in storage, newest first"))
    runs.add_argument("storage_uri", nargs="?", help="s3://bucket[/prefix] or file:///dir (default s3://orchestrator, local mode's store)")
    runs.add_argument("--job", help="only this job's runs (and searches over it)")
    runs.add_argument("--method", help="only runs of this adapter method (lora, lora_fa, vera, delta_lora)")
    runs.add_argument("--since", help="only runs written to since: an age (7d, 12h, 30m, 2w) or a date (2026-11-01)")
    show = naming_runs(commands.add_parser("show", help="a run's spec, versions, parameters, metrics, adapter and loss curves (PNG)"))
    show.add_argument("run", help="a run or search URI, or its path as `orchestrator runs` prints it (runs/<job>/<run-id>, tune/<search>)")
    show.add_argument("--open", action="store_true", help="open the plot in the desktop's viewer")
    compare = naming_runs(commands.add_parser("compare", help="several runs (or a search's trials) side by side: one table, one plot"))
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run URIs or paths; a search stands for all its trials")


def _cluster_commands(commands, job_command) -> None:
    def with_address(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (else RAY_ADDRESS)")
        return sub

    submit = with_address(job_command("submit", "submit a run (or with --tune a search) to a running Ray cluster"))
    submit.add_argument("--tune", action="store_true", help="submit the job's search instead of a single run")
    submit.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit with its status")
    submit.add_argument("--run-id", help="name the run (default: a new timestamped id)")
    submit.add_argument("--resume", action="store_true", help="resume the latest run of this job (or --run-id), or the search")
    submit.add_argument("--runtime-env", metavar="FILE", help="YAML/JSON merged over the job's runtime env (pip, py_modules, env_vars, …)")
    submit.add_argument("--cluster-credentials", action="store_true",
                        help="do not send this machine's AWS/HF credentials; the cluster's own role reaches the store")
    with_address(commands.add_parser("list", help="jobs on the cluster, newest first")).add_argument(
        "--all", action="store_true", help="include jobs not submitted by orchestrator")
    with_address(commands.add_parser("status", help="a submitted job's status")).add_argument("id", help="submission id")
    logs = with_address(commands.add_parser("logs", help="a submitted job's logs"))
    logs.add_argument("id", help="submission id")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
    with_address(commands.add_parser("stop", help="stop a submitted job (its last complete checkpoint is kept)")).add_argument(
        "id", help="submission id")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A plain `kill` would end Python without running any cleanup; make it unwind like Ctrl-C so
    # the embedded store and the local Ray runtime are shut down.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _dispatch(args)
    except OrchestratorError as error:
        print(f"{error.label}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


def console_entry() -> None:
    """The `orchestrator` command: main(), then exit without Python's module teardown.

    With torch, transformers and Ray loaded, that teardown takes about 1.4 s on 2 cores after the
    command's work is done: results are in storage, Ray is shut down and the store stopped. Exit
    handlers run last-registered first, so one registered now, before the command imports anything
    heavy, runs after the handlers of Ray, pyarrow and the rest, and ends the process there. Logging's
    handler (registered before it) is run by hand. An unexpected exception leaves normally.
    """
    exit_code = [1]  # what an unexpected exception's traceback exits with

    def exit_without_teardown() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code[0])

    atexit.register(exit_without_teardown)
    try:
        exit_code[0] = main()
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2)
        exit_code[0] = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    sys.exit(exit_code[0])


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "schema":
        if args.markdown:
            from orchestrator.spec_reference import markdown

            print(markdown(), end="")
        else:
            print(json.dumps(orchestrator.JobSpec.model_json_schema(), indent=2))
        return 0
    if args.command == "export":
        orchestrator.export(args.run_uri, args.out, merged=args.merged, endpoint_url=args.endpoint_url)
        return 0
    if args.command == "store":
        orchestrator.serve_store(args.dir)
        return 0
    if args.command == "up":
        orchestrator.up(idle_timeout_min=args.idle_timeout, cpus=args.cpus)
        return 0
    if args.command == "down":
        orchestrator.down()
        return 0
    if args.command in ("list", "status", "logs", "stop"):
        return _cluster_dispatch(args)
    if args.command in ("runs", "show", "compare"):
        return _results_dispatch(args)
    spec = orchestrator.load_spec(args.job, args.overrides)
    if args.command == "submit":
        from orchestrator.launch.submit import EXIT_CODES, load_runtime_env

        submission = orchestrator.submit(
            spec, address=args.address, tune=args.tune, run_id=args.run_id, resume=args.resume, follow=args.follow,
            runtime_env=load_runtime_env(args.runtime_env), cluster_credentials=args.cluster_credentials)
        return EXIT_CODES.get(submission.status, 1) if args.follow else 0
    if args.command == "validate":
        print(f"{args.job}: valid ({spec.adapter.method}, ZeRO-{spec.deepspeed.zero_stage}, {spec.scaling.num_workers} workers)")
        return 0
    if args.command == "plan":
        plan = orchestrator.plan(spec)
        print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.summary())
        return 0
    if args.command == "tune":
        orchestrator.tune(spec, local=args.local, resume=args.resume)
        return 0
    orchestrator.run(spec, local=args.local, run_id=args.run_id, resume=args.resume)
    return 0


def _cluster_dispatch(args: argparse.Namespace) -> int:
    from orchestrator.launch.cluster_client import dashboard_url

    if args.command == "list":
        rows = orchestrator.list_jobs(args.address, show_all=args.all)
        print(_table(rows, ("id", "status", "kind", "job", "started", "took", "results")) if rows else f"no jobs on {dashboard_url(args.address)}")
    elif args.command == "status":
        for key, value in orchestrator.status(args.id, args.address).items():
            print(f"{key:>10}: {value}")
    elif args.command == "stop":
        orchestrator.stop(args.id, args.address)
    else:
        status = orchestrator.logs(args.id, args.address, follow=args.follow)
        if args.follow:
            from orchestrator.launch.jobs import EXIT_CODES

            return EXIT_CODES.get(status, 1)
    return 0


def _results_dispatch(args: argparse.Namespace) -> int:
    from orchestrator.results import report

    def notice(line: str) -> None:  # stdout keeps only the tables
        print(line, file=sys.stderr)

    if args.command == "runs":
        records = orchestrator.runs(args.storage_uri, job=args.job, method=args.method, since=args.since,
                                    endpoint_url=args.endpoint_url, echo=notice)
        where = args.storage_uri or report.DEFAULT_STORAGE
        if not records:
            filtered = args.job or args.method or args.since
            print(f"no runs in {where}" + (" match --job / --method / --since" if filtered else ""))
            return 0
        rows = [report.overview_row(record) for record in records]
        print(_table(rows, tuple(rows[0])))
        print(f"({len(rows)} in {where}; `orchestrator show RUN` for one)")
    elif args.command == "show":
        shown = orchestrator.show(args.run, storage_uri=args.storage, endpoint_url=args.endpoint_url, out=args.out, echo=notice)
        search = isinstance(shown.record, report.SearchRecord)
        for label, text in (report.search_details(shown) if search else report.run_details(shown)):
            if "\n" in text:  # the spec, as YAML
                print(f"{label}:\n  " + text.replace("\n", "\n  "))
            else:
                print(f"{label:>10}  {text}")
        if search and shown.record.trials:
            rows = report.leaderboard_rows(shown.record)
            print("\n" + _table(rows, tuple(rows[0])))
        if args.open:
            report.open_plot(shown.curves_path, echo=notice)
    else:
        comparison = orchestrator.compare(args.runs, storage_uri=args.storage, endpoint_url=args.endpoint_url, out=args.out, echo=notice)
        rows = report.comparison_rows(comparison)
        print(_table(rows, tuple(rows[0])) + f"\nplot: {comparison.plot_path}")
    return 0


def _table(rows: list[dict], columns: tuple[str, ...]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
