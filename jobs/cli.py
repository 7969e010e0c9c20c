"""`shardwise` command line: run | status | tasks | validate.

Exit codes: 0 success; 1 the job ran and failed (error rate, a failed stage); 2 the request is wrong (spec
errors, missing files, refused output). Errors print one paragraph, never a Ray traceback wall; set
SHARDWISE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

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
        "--overwrite", action="store_true", help="discard existing output and recompute everything"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    status = sub.add_parser("status", help="state of a job's output directory")
    status.add_argument("output", help="the job's output.uri")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    tasks = sub.add_parser("tasks", help="list tasks: inputs, params and output schema")
    tasks.add_argument("--json", action="store_true")

    validate = sub.add_parser("validate", help="check a job spec without running it")
    validate.add_argument("spec")
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
            from pipeline.spec import load_spec

            spec = load_spec(args.spec, args.overrides)
            print(f"{args.spec}: ok ({spec.kind}, task {spec.stage.task})")
            return 0
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


def _run(args: argparse.Namespace) -> int:
    from pipeline.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
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

    result = run(spec, address=args.address, overwrite=args.overwrite, progress=not args.no_progress)
    print(
        f"{result.state}: {result.rows_ok} rows ok, {result.rows_error} errors, "
        f"{result.shards_total} shards ({result.shards_run} run, {result.shards_skipped} already committed), "
        f"{result.wall_s:.1f} s, {result.rows_per_s:.1f} rows/s → {result.output_uri}"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from pipeline.commit import OutputDir
    from pipeline.errors import OutputError

    out = OutputDir(args.output)
    manifest = out.read_json("_manifest.json")
    if manifest is None:
        raise OutputError(
            f"{args.output!r} has no _manifest.json: it is not a shardwise output (or the job never started)"
        )
    done = out.committed()
    state = manifest["state"]
    if state == "running":
        state = "running or interrupted"  # a killed driver cannot say; rerun the job to resume
    if out.exists("_SUCCESS"):
        state = "succeeded"
    rows_in = sum(r.rows_in for r in done.values())
    rows_error = sum(r.rows_error for r in done.values())
    info: dict[str, Any] = {
        "state": state,
        "name": manifest["name"],
        "shards_done": len(done),
        "shards_total": manifest["shards_total"],
        "rows_ok": rows_in - rows_error,
        "rows_error": rows_error,
        "reason": manifest.get("reason"),
        "runs": len(manifest.get("runs", [])),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(
            f"{info['name']}: {state}; shards {info['shards_done']}/{info['shards_total']}; "
            f"rows ok {info['rows_ok']}, errors {info['rows_error']}; runs {info['runs']}"
        )
        if info["reason"]:
            print(f"reason: {info['reason']}")
    return 0


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
