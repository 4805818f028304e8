"""The command line: parses arguments and calls the Python API; user mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import signal
import sys

import orchestrator
from orchestrator.errors import OrchestratorError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
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
    export = commands.add_parser("export", help="write a finished run's adapter (PEFT format) or merged model to a directory")
    export.add_argument("run_uri", help="s3://bucket[/prefix]/runs/<job>/<run-id> (as printed by run)")
    export.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    export.add_argument("--merged", action="store_true", help="merge the adapter into the base model (save_pretrained)")
    export.add_argument("--endpoint-url", help="S3 endpoint (else AWS_ENDPOINT_URL; local-mode runs use the embedded store)")
    commands.add_parser("schema", help="print the job spec's JSON Schema")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A plain `kill` would end Python without running any cleanup; make it unwind like Ctrl-C so
    # the embedded store and the local Ray runtime are shut down.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _dispatch(args)
    except OrchestratorError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "schema":
        print(json.dumps(orchestrator.JobSpec.model_json_schema(), indent=2))
        return 0
    if args.command == "export":
        orchestrator.export(args.run_uri, args.out, merged=args.merged, endpoint_url=args.endpoint_url)
        return 0
    spec = orchestrator.load_spec(args.job, args.overrides)
    if args.command == "validate":
        print(f"{args.job}: valid ({spec.adapter.method}, ZeRO-{spec.deepspeed.zero_stage}, {spec.scaling.num_workers} workers)")
        return 0
    if args.command == "plan":
        return _print_plan(orchestrator.plan(spec), as_json=args.json)
    if args.command == "tune":
        orchestrator.tune(spec, local=args.local, resume=args.resume)
        return 0
    orchestrator.run(spec, local=args.local, run_id=args.run_id, resume=args.resume)
    return 0


def _print_plan(plan, as_json: bool) -> int:
    summary = {
        "job": plan.spec.name,
        "adapter": plan.spec.adapter.model_dump(mode="json"),
        "workers": plan.spec.scaling.num_workers,
        "resources_per_worker": plan.worker_resources,
        "cluster_needs": plan.cluster_needs,
        "global_batch": plan.global_batch,
        "learning_rates": ({"A": plan.spec.optim.lr, "B": plan.spec.optim.lr * plan.spec.optim.lora_plus_ratio}
                           if plan.spec.optim.lora_plus_ratio else {"adapter": plan.spec.optim.lr}),
        "adapted_layers": len(plan.adapted_layers),
        "trainable_parameters": plan.trainable_parameters,
        "base_parameters": plan.base_parameters,
        "trainable_percent": round(plan.trainable_percent, 4),
        "deepspeed": plan.deepspeed,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        if key != "deepspeed":
            print(f"{key:>22}: {value}")
    print("             deepspeed:")
    print("  " + json.dumps(plan.deepspeed, indent=2).replace("\n", "\n  "))
    return 0
