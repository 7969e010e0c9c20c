"""`shardwise` command line: run | status | tasks | validate | submit | jobs | schedule | evaluate | report |
preview.

Exit codes: 0 success; 1 the job ran and failed (error rate, a failed stage); 2 the request is wrong (spec
errors, missing files, refused output, an output held by another run, a damaged manifest). `status` exits
with the output's state (pipeline.status: 0 succeeded, 1 failed, 3 incomplete, 4 interrupted/partial,
5 running). Errors print one paragraph, never a Ray traceback wall; set
SHARDWISE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
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
    run.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs (default: a file in <cache>/logs)"
    )

    status = sub.add_parser("status", help="state of a job's output directory")
    status.add_argument("output", help="the job's output.uri")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--verify", action="store_true", help="also check every part's sha256")
    status.add_argument(
        "--watch",
        action="store_true",
        help="refresh while a run holds the output (rows, rows/s, ETA, stages)",
    )
    status.add_argument("--interval", type=float, default=2.0, metavar="S", help="--watch refresh period")

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

    _add_cluster_parsers(sub)
    _add_evaluate_parser(sub)
    _add_see_parsers(sub)
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
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command in _SEE_COMMANDS:
            return _SEE_COMMANDS[args.command](args)
        if args.command in _CLUSTER_COMMANDS:
            return _CLUSTER_COMMANDS[args.command](args)
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


def _describe_stages(spec: Any) -> str:
    if len(spec.stages) == 1:
        return f"task {spec.stage.task}"
    return f"{len(spec.stages)} stages: " + ", ".join(f"{s.name} ({s.task})" for s in spec.stages)


def _validate(args: argparse.Namespace) -> int:
    """Everything `run` checks before it starts Ray: the spec, the model, the input and its columns, and
    that the output is a safe place to write."""
    from pipeline.bind import load_job as load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.spec_only:
        print(f"{args.spec}: spec ok ({spec.kind}, {_describe_stages(spec)})")
        return 0
    if spec.kind == "inference":
        from pipeline.execute import preflight

        prep = preflight(spec)
        for note in prep.notes:
            print(f"shardwise: warning: {note}", file=sys.stderr)
        print(
            f"{args.spec}: ok (inference, {_describe_stages(spec)}; {prep.rows_total} rows in "
            f"{len(prep.fragments)} file(s), {len(prep.shards)} shards → {spec.output.uri})"
        )
        return 0
    from jobs.finetune import check_locations
    from pipeline.execute import check_model

    check_locations(spec)
    check_model(spec.stage.model, revision=spec.stage.revision, key="stages[0].model")
    print(f"{args.spec}: ok (finetune, task {spec.stage.task} → {spec.output.uri})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipeline.bind import load_job as load_spec

    overrides = list(args.overrides)
    if args.limit is not None:
        overrides.append(f"input.limit={args.limit}")
    spec = load_spec(args.spec, overrides)
    if not args.verbose:
        from pipeline.cluster import quiet_console

        quiet_console()
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


def _watch(args: argparse.Namespace) -> None:
    """Refresh from the manifest (the driver rewrites it every few seconds) and the lease, both small, while
    a run holds the output; the full status (every commit record checked) is printed after."""
    from pipeline.commit import OutputDir
    from pipeline.lease import read_lease
    from pipeline.metrics import read_live

    out = OutputDir(args.output)
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    seen: list[tuple[float, int]] = []
    while True:
        manifest = out.read_manifest() or {}
        lease = read_lease(out)
        if lease is None or not lease.live():
            return
        done, total = int(manifest.get("rows_in") or 0), int(manifest.get("rows_total") or 0)
        seen = [*seen[-30:], (time.monotonic(), done)]
        rate = (done - seen[0][1]) / (seen[-1][0] - seen[0][0]) if seen[-1][0] > seen[0][0] else 0.0
        eta = f"{(total - done) / rate:.0f} s" if rate > 0 and total >= done else "?"
        lines = [
            f"{manifest.get('name')}: running ({lease.describe()})",
            f"rows {done}/{total} ({done / total:.1%}), {rate:.1f} rows/s, ETA {eta}; "
            f"errors {manifest.get('rows_error', 0)}"
            if total
            else f"rows {done}, {rate:.1f} rows/s; errors {manifest.get('rows_error', 0)}",
        ]
        live = (read_live(out, lease.run_id) or {}).get("stages") or {}
        for name, c in (manifest.get("stages") or {}).items():
            lines.append(
                f"  stage {name}: {c['rows_in']} rows in, {c['rows_ok']} ok, {c['rows_error']} errors"
                + _live_stage(live.get(name))
            )
        print(clear + "\n".join(lines), flush=True)
        time.sleep(args.interval)


def _live_stage(live: dict[str, Any] | None) -> str:
    """`; 12.5 rows/s, replicas 80% busy, 64 rows waiting for the replicas, padding 91%` from the job
    metrics' live.json (pipeline.metrics; rates over its last window), or "" when there is none."""
    if not live:
        return ""
    parts = [f"{live['rows_per_s']:.1f} rows/s"]
    if live.get("busy_share") is not None:
        parts.append(f"replicas {live['busy_share']:.0%} busy")
    if live.get("waiting_forward"):
        parts.append(f"{live['waiting_forward']} rows waiting for the replicas")
    if live.get("padding_efficiency") is not None:
        parts.append(f"padding {live['padding_efficiency']:.0%} efficient")
    return "; " + ", ".join(parts)


def _status(args: argparse.Namespace) -> int:
    from pipeline.status import output_status

    if args.watch:
        _watch(args)
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
    stages = info.get("stages") or {}
    if len(stages) > 1:
        for name, c in stages.items():
            print(f"  stage {name}: {c['rows_in']} rows in, {c['rows_ok']} ok, {c['rows_error']} errors")
    if info["holder"]:
        print(f"held by {info['holder']}")
    if state == "interrupted":
        print("no run holds it now: rerun the same job to resume from its committed shards")
    if info["reason"] and state in ("failed", "interrupted"):
        print(f"reason: {info['reason']}")
    for run in info.get("run_log", [])[-5:]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.get("started") or run["finished_at"]))
        added = f", {len(run['files_added'])} file(s) added" if run.get("files_added") else ""
        print(
            f"run {run['run_id']} ({when}): {run['state']}, {run.get('shards_run', 0)} shards"
            + (f", {run['rows_ok']} rows ok, {run['rows_error']} errors" if "rows_ok" in run else "")
            + f"{added}, {run.get('wall', 0):.1f} s"
        )
    for problem in info["problems"][:20]:
        print(f"problem: {problem}")
    if len(info["problems"]) > 20:
        print(f"... and {len(info['problems']) - 20} more problems")
    if state == "incomplete":
        print("rerun the job (resume) to compute the missing or damaged shards again")
    return int(info["exit_code"])


def _tasks(args: argparse.Namespace) -> int:
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


# -------------------------------------------------------------------------------------------------------
# submit | jobs list|status|logs|stop | schedule  (jobs/submit.py, jobs/schedule.py)


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="Ray job server, e.g. http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, "
        "http://127.0.0.1:8265)",
    )
    p.add_argument(
        "--auth-token-file",
        default=None,
        metavar="PATH",
        help="file holding the cluster's Ray auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH)",
    )


def _add_cluster_parsers(sub: Any) -> None:
    submit = sub.add_parser("submit", help="run a job spec on a Ray cluster (Ray Jobs API) and return")
    submit.add_argument("spec", help="job spec YAML")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    _add_connection_args(submit)
    submit.add_argument("--overwrite", action="store_true", help="discard existing output")
    submit.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the driver waits up to SECONDS for another run holding the output (as `run --wait`)",
    )
    submit.add_argument(
        "--local-paths-ok",
        action="store_true",
        help="allow absolute local paths in the spec: every node of the cluster mounts them",
    )

    jobs = sub.add_parser("jobs", help="shardwise jobs submitted to a Ray cluster")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = jobs_sub.add_parser("list", help="submitted shardwise jobs, oldest first")
    listing.add_argument("--json", action="store_true")
    status = jobs_sub.add_parser("status", help="one job's state")
    status.add_argument("id", help="submission id (printed by submit)")
    status.add_argument("--json", action="store_true")
    logs = jobs_sub.add_parser("logs", help="the job driver's log")
    logs.add_argument("id")
    logs.add_argument(
        "--follow", action="store_true", help="stream until the job ends; exit 0 only if it succeeded"
    )
    stop = jobs_sub.add_parser("stop", help="stop a job; its committed shards stay (resubmit resumes)")
    stop.add_argument("id")
    for p in (listing, status, logs, stop):
        _add_connection_args(p)

    schedule = sub.add_parser("schedule", help="run (or --submit) a job spec at every cron tick")
    schedule.add_argument("spec", help="job spec YAML (read again at every run)")
    schedule.add_argument("--cron", required=True, help='cron expression, e.g. "0 2 * * *" (local time)')
    schedule.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    schedule.add_argument(
        "--address",
        default=None,
        help="local runs: the Ray cluster to join (as `run --address`); with --submit: the job server",
    )
    schedule.add_argument("--submit", action="store_true", help="submit each run to the cluster (Jobs API)")
    schedule.add_argument("--auth-token-file", default=None, metavar="PATH", help="with --submit")
    schedule.add_argument("--local-paths-ok", action="store_true", help="with --submit, as in submit")
    schedule.add_argument("--log-file", default=None, help="default: ./<job name>.schedule.log")
    schedule.add_argument("--run-at-start", action="store_true", help="one run now, then at each tick")


def _submit(args: argparse.Namespace) -> int:
    from jobs.submit import submit

    submission_id = submit(
        args.spec,
        overrides=args.overrides,
        address=args.address,
        overwrite=args.overwrite,
        local_paths_ok=args.local_paths_ok,
        token_file=args.auth_token_file,
        wait_s=args.wait,
        warn=lambda message: print(f"shardwise: warning: {message}", file=sys.stderr),
    )
    print(submission_id)
    print(f"follow it: shardwise jobs logs {submission_id} --follow", file=sys.stderr)
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _jobs(args: argparse.Namespace) -> int:
    from jobs.submit import connect, job_info, job_logs, list_jobs, stop_job

    client = connect(args.address, token_file=args.auth_token_file)
    if args.jobs_command == "list":
        listing = list_jobs(client)
        if args.json:
            print(json.dumps([dataclasses.asdict(j) for j in listing]))
            return 0
        for j in listing:
            print(f"{j.submission_id}  {j.status:<9}  {_when(j.start_time)}  {j.name}  → {j.output}")
        return 0
    if args.jobs_command == "status":
        info = job_info(client, args.id)
        if args.json:
            print(json.dumps(dataclasses.asdict(info)))
            return 0
        print(f"{info.submission_id}: {info.status}; job {info.name} → {info.output}")
        print(f"started {_when(info.start_time)}, ended {_when(info.end_time)}")
        if info.message:
            print(f"message: {info.message}")
        return 0
    if args.jobs_command == "logs":
        info = job_logs(client, args.id, follow=args.follow, write=lambda s: print(s, end="", flush=True))
        if args.follow:
            print(f"[{info.submission_id}: {info.status}]", file=sys.stderr)
            return 0 if info.status == "SUCCEEDED" else 1
        return 0
    info = stop_job(client, args.id)
    print(f"{info.submission_id}: {info.status}")
    if info.output and info.status == "STOPPED":
        print(f"committed shards in {info.output} are kept; submit the same spec again to resume")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from jobs.schedule import (
        Scheduler,
        SubmitRun,
        SubprocessRun,
        check_cron,
        default_log_file,
        install_signal_handlers,
        log_to,
    )
    from pipeline.bind import load_job as load_spec

    check_cron(args.cron)
    spec = load_spec(args.spec, args.overrides)  # a bad spec is refused before the first tick
    log_file = Path(args.log_file) if args.log_file else default_log_file(spec.name)
    log = log_to(log_file)
    if args.submit:
        from jobs.submit import check_paths

        check_paths(spec, local_paths_ok=args.local_paths_ok)
        run_once: Any = SubmitRun(
            args.spec,
            overrides=args.overrides,
            address=args.address,
            local_paths_ok=args.local_paths_ok,
            token_file=args.auth_token_file,
            log_file=log_file,
        )
    else:
        run_once = SubprocessRun(args.spec, overrides=args.overrides, address=args.address, log_file=log_file)
    scheduler = Scheduler(
        args.cron, run_once, interrupt=run_once.interrupt, log=log, run_at_start=args.run_at_start
    )
    install_signal_handlers(scheduler)
    log(f"job {spec.name} ({args.spec}); log file {log_file}")
    scheduler.run()
    return 0


_CLUSTER_COMMANDS = {"submit": _submit, "jobs": _jobs, "schedule": _schedule}


def _add_evaluate_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "evaluate", help="score an inference output against a labelled column (task metrics, per class)"
    )
    ev.add_argument("output", help="the inference job's output.uri")
    ev.add_argument(
        "--labels",
        required=True,
        metavar="COLUMN",
        help="the labelled column (kept in the output, or in the input)",
    )
    ev.add_argument(
        "--input",
        default=None,
        metavar="URI",
        help="read the labels from this input (default: the job's input)",
    )
    ev.add_argument("--task", default=None, help="score as this task (default: the output's task)")
    ev.add_argument(
        "--stage", default=None, metavar="NAME", help="in a multi-stage output, the stage to score"
    )
    ev.add_argument(
        "--label-names",
        default=None,
        metavar="A,B,...",
        help="names of integer label ids, in id order (labels stored as fine-tune ids)",
    )
    ev.add_argument(
        "-o", dest="out_file", default=None, metavar="FILE", help="also write the JSON report here"
    )
    ev.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


def _evaluate(args: argparse.Namespace) -> int:
    from jobs.evaluate import eval_file, evaluate, format_table

    names = args.label_names.split(",") if args.label_names else None
    report = evaluate(
        args.output,
        labels=args.labels,
        input_uri=args.input,
        task=args.task,
        label_names=names,
        stage=args.stage,
    )
    text = json.dumps(report, indent=1, sort_keys=True)
    if args.out_file:
        with open(args.out_file, "w") as f:
            f.write(text + "\n")
    print(
        text
        if args.json
        else f"{format_table(report)}\nwritten to {args.output.rstrip('/')}/{eval_file(report['stage'])}"
    )
    return 0


# -------------------------------------------------------------------------------------------------------
# report | preview  (jobs/report.py, jobs/preview.py): self-contained HTML pages about an output


def _storage_options_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help='fsspec options for the output and the job\'s input, e.g. \'{"endpoint_url": "..."}\' (the '
        "manifest never holds them)",
    )


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    from pipeline.errors import SpecError

    if args.storage_options is None:
        return None
    try:
        value = json.loads(args.storage_options)
    except ValueError as e:
        raise SpecError(
            "--storage-options", f"is not JSON ({e}); give an object, e.g. '{{\"anon\": true}}'"
        ) from e
    if not isinstance(value, dict):
        raise SpecError("--storage-options", f"must be a JSON object, got {type(value).__name__}")
    return value


def _add_see_parsers(sub: Any) -> None:
    report = sub.add_parser(
        "report", help="one self-contained HTML page: summary, stages, runtime plots, errors, distributions"
    )
    report.add_argument("output", help="the job's output.uri")
    report.add_argument(
        "-o", dest="out_file", default="report.html", metavar="FILE", help="default: report.html"
    )
    _storage_options_arg(report)
    preview = sub.add_parser(
        "preview", help="the first (or --sample) N predictions drawn as HTML: boxes, masks, spans, audio, ..."
    )
    preview.add_argument("output", help="the inference job's output.uri")
    preview.add_argument("--n", type=int, default=24, metavar="N", help="rows to show (default 24)")
    preview.add_argument(
        "--sample", action="store_true", help="a seeded random sample instead of the first rows"
    )
    preview.add_argument("--seed", type=int, default=0, help="--sample's seed (default 0)")
    preview.add_argument(
        "-o", dest="out_file", default="preview.html", metavar="FILE", help="default: preview.html"
    )
    _storage_options_arg(preview)


def _report(args: argparse.Namespace) -> int:
    from jobs.report import write_report

    facts = write_report(args.output, args.out_file, storage_options=_storage_options(args))
    print(
        f"{args.out_file}: report of {args.output} ({facts['state']}; {facts['plots']} plots, {facts['bytes']:,} bytes)"
    )
    return 0


def _preview(args: argparse.Namespace) -> int:
    from jobs.preview import write_preview

    facts = write_preview(
        args.output,
        args.out_file,
        n=args.n,
        sample=args.sample,
        seed=args.seed,
        storage_options=_storage_options(args),
    )
    print(
        f"{args.out_file}: {facts['rows']} rows of {args.output} ({facts['images']} images, {facts['audio']} audio "
        f"players, {facts['bytes']:,} bytes)"
    )
    return 0


_SEE_COMMANDS = {"report": _report, "preview": _preview}


if __name__ == "__main__":
    sys.exit(main())
