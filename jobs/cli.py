"""`shardwise` command line: run | status | tasks | validate.

Exit codes: 0 success; 1 the job ran and failed (error rate, a failed stage); 2 the request is wrong (spec
errors, missing files, refused output, an output held by another run, a damaged manifest). `status` exits
with the output's state (pipeline.status: 0 succeeded, 1 failed, 3 incomplete, 4 interrupted/partial,
5 running). Errors print one paragraph, never a Ray traceback wall; set
SHARDWISE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardwise", description="Run Transformer tasks over big datasets on Ray."
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a job spec")
    run.add_argument("spec", help="job spec YAML")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec key, e.g. --set stages.0.batch_size=64 (repeatable)",
    )
    run.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (e.g. auto, ray://host:10001); default: an embedded local cluster",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="delete this job's earlier results in output.uri (only files shardwise wrote) and recompute",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--verify",
        action="store_true",
        help="on resume, re-read every committed part and check its sha256 (default: sizes only)",
    )
    run.add_argument(
        "--verify-input",
        action="store_true",
        help="hash the input files and refuse to resume over content changed in place (reads all input)",
    )
    run.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for another run that holds the output (default: exit 2 at once)",
    )
    run.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N rows (a trial run)"
    )

    status = sub.add_parser("status", help="state of a job's output directory")
    status.add_argument("output", help="the job's output.uri")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--verify", action="store_true", help="also check every part's sha256")

    tasks = sub.add_parser("tasks", help="list tasks: inputs, params and output schema")
    tasks.add_argument("--json", action="store_true")

    validate = sub.add_parser(
        "validate", help="check a job without running it: spec, model, input columns, output location"
    )
    validate.add_argument("spec")
    validate.add_argument(
        "--spec-only", action="store_true", help="check the spec's keys and values only (no files are read)"
    )
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    return p


def _fail(message: str, code: int) -> int:
    print(f"shardwise: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.errors import ErrorRateExceeded, JobFailed, ShardwiseError

    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "status":
            return _status(args)
        if args.command == "tasks":
            return _tasks(args)
        if args.command == "validate":
            return _validate(args)
    except (ErrorRateExceeded, JobFailed) as e:
        if os.environ.get("SHARDWISE_DEBUG"):
            traceback.print_exc()
        return _fail(str(e), 1)
    except ShardwiseError as e:
        if os.environ.get("SHARDWISE_DEBUG"):
            traceback.print_exc()
        return _fail(str(e), 2)
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume from the committed shards", 130)
    return 2


def _validate(args: argparse.Namespace) -> int:
    """Everything `run` checks before it starts Ray: the spec, the model, the input and its columns, and
    that the output is a safe place to write."""
    from pipeline.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.spec_only:
        print(f"{args.spec}: spec ok ({spec.kind}, task {spec.stage.task})")
        return 0
    if spec.kind == "inference":
        from pipeline.execute import preflight

        prep = preflight(spec)
        for note in prep.notes:
            print(f"shardwise: warning: {note}", file=sys.stderr)
        print(
            f"{args.spec}: ok (inference, task {spec.stage.task}; {prep.rows_total} rows in "
            f"{len(prep.fragments)} file(s), {len(prep.shards)} shards → {spec.output.uri})"
        )
        return 0
    from jobs.finetune import _check_locations
    from pipeline.execute import _check_model

    _check_locations(spec)
    _check_model(spec.stage.model, revision=spec.stage.revision, key="stages[0].model")
    print(f"{args.spec}: ok (finetune, task {spec.stage.task} → {spec.output.uri})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipeline.spec import load_spec

    overrides = list(args.overrides)
    if args.limit is not None:
        overrides.append(f"input.limit={args.limit}")
    spec = load_spec(args.spec, overrides)
    if spec.kind == "finetune":
        from jobs.finetune import run_finetune

        ft = run_finetune(spec, address=args.address, progress=not args.no_progress, overwrite=args.overwrite)
        last = ft.metrics[-1] if ft.metrics else {}
        print(
            f"fine-tuned {spec.stage.model} → {ft.output_uri} in {ft.wall_s:.1f} s "
            f"({ft.train_rows} train / {ft.eval_rows} eval rows, {ft.epochs} epochs; "
            f"eval accuracy {last.get('eval_accuracy', float('nan')):.4f})"
        )
        return 0
    from jobs.inference import run

    result = run(
        spec,
        address=args.address,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        verify=args.verify,
        verify_input=args.verify_input,
        wait_s=args.wait,
    )
    if result.shards_run == 0:
        print(
            f"{result.state}: nothing to do, all {result.shards_total} shards were already committed "
            f"({result.rows_ok} rows ok, {result.rows_error} errors) → {result.output_uri}"
        )
        return 0
    print(
        f"{result.state}: {result.rows_ok} rows ok, {result.rows_error} errors, "
        f"{result.shards_total} shards ({result.shards_run} run, {result.shards_skipped} already committed), "
        f"{result.wall_s:.1f} s, {result.rows_per_s:.1f} rows/s this run → {result.output_uri}"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from pipeline.status import output_status

    info = output_status(args.output, verify=args.verify)
    if args.json:
        print(json.dumps(info, default=str))
        return int(info["exit_code"])
    state = info["state"]
    if info["kind"] == "finetune":
        line = f"{info['name']}: {state} (fine-tune); {info.get('files', 0)} model files"
        if info.get("epochs") is not None:
            line += f"; {info['epochs']} epoch(s)"
    else:
        line = (
            f"{info['name']}: {state}; shards {info['shards_done']}/{info['shards_total']}; "
            f"rows ok {info['rows_ok']}, errors {info['rows_error']}; runs {info['runs']}"
        )
    print(line)
    if info["holder"]:
        print(f"held by {info['holder']}")
    if state == "interrupted":
        print("no run holds it now: rerun the same job to resume from its committed shards")
    if info["reason"] and state in ("failed", "interrupted"):
        print(f"reason: {info['reason']}")
    for problem in info["problems"][:20]:
        print(f"problem: {problem}")
    if len(info["problems"]) > 20:
        print(f"... and {len(info['problems']) - 20} more problems")
    if state == "incomplete":
        print("rerun the job (resume) to compute the missing or damaged shards again")
    return int(info["exit_code"])


def _tasks(args: argparse.Namespace) -> int:
    import dataclasses

    from models.registry import available_tasks, describe_params

    listing = {}
    for name, task in available_tasks().items():
        params_cls = type(task.parse_params({}, key="params"))
        schema = task.output_schema(task.parse_params({}, key="params"))
        listing[name] = {
            "description": task.description,
            "inputs": {k: ("required" if v else "optional") for k, v in task.inputs.items()},
            "params": describe_params(params_cls) if dataclasses.is_dataclass(params_cls) else {},
            "output": {f.name: str(f.type) for f in schema},
        }
    if args.json:
        print(json.dumps(listing, indent=1))
        return 0
    for name, info in listing.items():
        print(f"{name}: {info['description']}")
        print(f"  inputs: {', '.join(f'{k} ({v})' for k, v in info['inputs'].items())}")
        print(f"  params: {', '.join(f'{k}: {v}' for k, v in info['params'].items())}")
        print(f"  output: {', '.join(f'{k}: {v}' for k, v in info['output'].items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
