"""Run an inference job (the driver): spec → bind → plan → the Ray Data graph → commit records → manifest.

The graph and the functions its workers run are in `pipeline.graph`; this module checks the job before Ray
starts (`preflight`), holds the output's lease, consumes commit records (progress, error rate, the manifest
with per-stage counts), and checks every planned shard on storage at the end before writing `_SUCCESS`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

import pipeline.errors as errors
from models import loading
from models.loading import model_identity
from pipeline import __version__
from pipeline.bind import BoundJob, bind
from pipeline.cluster import init_ray
from pipeline.commit import OUTPUT_FORMAT, READ_STAGE, Ledger, OutputDir, ShardRecord
from pipeline.errors import (
    ErrorRateExceeded,
    FingerprintMismatch,
    JobFailed,
    ShardwiseError,
    SourceError,
    SpecError,
)
from pipeline.graph import GraphJob, build_dataset, embedded_cpus, min_cpus
from pipeline.lease import Lease
from pipeline.locations import check_output_location
from pipeline.metrics import RunMetrics, unit_of
from pipeline.metrics import enabled as metrics_enabled
from pipeline.plan import Shard, fingerprint, plan_shards
from pipeline.redact import redact, scrub, secret_values
from pipeline.sources import (
    Fragment,
    content_hashes,
    describe_files,
    input_schema,
    list_files,
    list_fragments,
    resolve_format,
)
from pipeline.spec import JobSpec, spec_to_dict
from pipeline.status import stage_counts

__all__ = [
    "JobResult",
    "Prepared",
    "check_model",
    "embedded_cpus",
    "init_ray",
    "new_run_id",
    "preflight",
    "run_inference",
]

log = logging.getLogger(__name__)

# How often the driver refreshes _manifest.json while a job runs.
_MANIFEST_EVERY_S = 5.0


@dataclass
class JobResult:
    output_uri: str
    state: str
    shards_total: int
    shards_run: int
    shards_skipped: int
    rows_in: int
    rows_ok: int
    rows_error: int
    wall_s: float
    run_id: str
    # Rows this run computed (not those an earlier run committed).
    rows_run: int = 0
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Ray Data's execution stats of this run's graph (`Dataset.stats()`): one line per operator.
    graph_stats: str = field(repr=False, default="")

    @property
    def rows_per_s(self) -> float:
        return self.rows_run / self.wall_s if self.wall_s > 0 else 0.0


# -------------------------------------------------------------------------------------------------------
# Driver


def _check_columns(job: BoundJob, schema: pa.Schema) -> None:
    """Every column the job reads is in the input, and nothing it writes collides with a kept column."""
    spec = job.spec
    names = set(schema.names)
    earlier: list[str] = []
    for stage in job.stages:
        for task_input, src in stage.inputs:
            if src.stage is None and src.column not in names:
                named, dot, _ = src.source.partition(".")
                hint = (
                    f", and no earlier stage is named {named!r} (earlier stages: {earlier})"
                    if dot and job.multi
                    else ""
                )
                raise SpecError(
                    f"stages[{stage.index}].inputs.{task_input}",
                    f"column {src.column!r} is not in the input{hint}; its columns: {schema.names}",
                )
        earlier.append(stage.name)
    if spec.input.id_column and spec.input.id_column not in names:
        raise SpecError(
            "input.id_column",
            f"column {spec.input.id_column!r} is not in the input; its columns: {schema.names}",
        )
    written = set(job.output_schema().names)
    for col, name in job.keep_columns:
        if col not in names:
            raise SpecError(
                "input.keep_columns", f"column {col!r} is not in the input; its columns: {schema.names}"
            )
        if name in written and not job.multi:
            raise SpecError(
                "input.keep_columns",
                f"column {col!r} would be kept as {name!r}, which is also a field the task writes; rename it in "
                f"the output with a mapping, e.g. keep_columns: {{{col}: input_{col}}}",
            )
    if spec.input.id_column is None and "id" in dict(job.keep_columns).values():
        raise SpecError(
            "input.keep_columns",
            "keeps a column named 'id' but input.id_column is not set; set input.id_column: id (or rename it "
            "with keep_columns: {id: input_id})",
        )


@dataclass(frozen=True)
class Prepared:
    """A job checked before Ray starts: its input listed and planned, its model and output vetted."""

    job: BoundJob  # its spec's input.format resolved
    fragments: list[Fragment]
    shards: list[Shard]
    fingerprint: str
    parts: dict[str, Any]
    notes: list[str]
    # Incremental jobs: every file the output covers once this run succeeds (rel → [size, version, rows]),
    # the files this run adds, and files an earlier run annotated that the input no longer lists.
    files: dict[str, list[Any]] | None = None
    files_added: tuple[str, ...] = ()
    files_removed: tuple[str, ...] = ()

    @property
    def rows_total(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def spec(self) -> JobSpec:
        return self.job.spec


def check_model(model: str, *, revision: str | None, key: str) -> None:
    check = getattr(loading, "check_model", None)
    try:
        if check is not None:
            check(model, revision=revision)
        else:
            loading.resolve_model(model, revision=revision)
    except ShardwiseError as e:
        raise type(e)(f"{key}: {e}") from e


def _check_writable(uri: str) -> None:
    """A local output's nearest existing folder must be writable (object stores fail at the first write)."""
    if "://" in uri and not uri.startswith("file://"):
        return
    path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise SpecError("output.uri", f"{uri!r} cannot be written here ({path} is not a writable folder)")


def _check_job(spec: JobSpec) -> BoundJob:
    """Bind the spec (tasks, params, stage references), check that every stage's model resolves, that the
    output is a safe and writable place, and the input's format. Nothing is planned yet."""
    job = bind(spec)
    checked: set[tuple[str, str | None]] = set()
    for stage in job.stages:
        if (stage.model, stage.revision) not in checked:
            check_model(stage.model, revision=stage.revision, key=f"stages[{stage.index}].model")
            checked.add((stage.model, stage.revision))
    check_output_location(
        spec.output.uri,
        key="output.uri",
        protected=[("input.uri", spec.input.uri)]
        + [(f"stages[{i}].model", s.model) for i, s in enumerate(spec.stages)],
    )
    _check_writable(spec.output.uri)
    return dataclasses.replace(job, spec=dataclasses.replace(spec, input=resolve_format(spec.input)))


def _plan_job(
    job: BoundJob,
    fragments: list[Fragment],
    *,
    incremental: bool = False,
    allow_no_rows: bool = False,
) -> Prepared:
    spec = job.spec
    if fragments:
        _check_columns(job, input_schema(spec.input, fragments[0]))
    notes: list[str] = []
    shards = plan_shards(spec, fragments, notes=notes)
    if not shards and not (spec.input.allow_empty or allow_no_rows):
        raise SourceError(
            f"input.uri {spec.input.uri!r} has no rows ({len(fragments)} file(s), all empty); check the path or "
            "glob, or set input.allow_empty: true if an empty input is expected (the job then succeeds with "
            "no part files)"
        )
    identities: dict[tuple[str, str | None], dict[str, Any]] = {}
    for s in job.stages:
        if (s.model, s.revision) not in identities:
            identities[(s.model, s.revision)] = model_identity(s.model, revision=s.revision)
    fp, parts = fingerprint(
        job,
        fragments,
        model_identities={s.name: identities[(s.model, s.revision)] for s in job.stages},
        with_files=not incremental,
    )
    return Prepared(job, fragments, shards, fp, parts, notes)


def preflight(spec: JobSpec) -> Prepared:
    """Everything that can be checked before Ray starts: the tasks and params, every stage's references, that
    the models resolve, that the input exists, has rows and the mapped columns, and that the output is a
    safe, writable place."""
    job = _check_job(spec)
    return _plan_job(job, list_fragments(job.spec.input), incremental=spec.output.mode == "incremental")


def _plan_incremental(job: BoundJob, previous: dict[str, Any] | None) -> Prepared:
    """Plan only the files an incremental output does not cover yet. Files already done (same path, size and
    mtime/etag) are skipped without being opened. A done file that changed is refused, naming it (its old
    predictions cannot be replaced atomically); a done file that disappeared keeps its predictions."""
    spec = job.spec
    done: dict[str, list[Any]] = dict((previous or {}).get("files") or {})
    entries = list_files(spec.input)
    listed = {e.rel for e in entries}
    changed = [e.rel for e in entries if e.rel in done and list(done[e.rel][:2]) != [e.size, e.version]]
    if changed:
        raise SourceError(
            f"input file(s) {changed[:5]} changed since an earlier run of this incremental output annotated "
            "them (size or mtime/etag differ); incremental mode only adds new files. Restore them, write the "
            "new content under a new file name, or rerun with --overwrite to annotate everything again"
        )
    new = [e for e in entries if e.rel not in done]
    fragments = describe_files(spec.input, new)
    prep = _plan_job(job, fragments, incremental=True, allow_no_rows=bool(done))
    files = {**done, **{f.rel: [f.size, f.version, f.num_rows] for f in fragments}}
    return dataclasses.replace(
        prep,
        files=files,
        files_added=tuple(f.rel for f in fragments),
        files_removed=tuple(sorted(set(done) - listed)),
    )


def _manifest(
    prep: Prepared,
    ledger: Ledger,
    *,
    state: str,
    runs: list[dict[str, Any]],
    input_sha256: dict[str, str] | None,
    reason: str | None = None,
) -> dict[str, Any]:
    """The driver's summary of the job. Its size does not grow with the shard count: per-shard state lives
    in `_shards/` (commit records)."""
    spec = prep.spec
    rows_in = ledger.rows_in
    return {
        "format": OUTPUT_FORMAT,
        "shardwise": __version__,
        "name": spec.name,
        "kind": spec.kind,
        "state": state,
        "reason": reason,
        "fingerprint": prep.fingerprint,
        "fingerprint_parts": redact(prep.parts),
        "spec": redact(spec_to_dict(spec)),
        "shards_total": len(prep.shards),
        "shards_done": len(ledger.done),
        "rows_total": prep.rows_total,
        "rows_in": rows_in,
        "rows_ok": rows_in - ledger.rows_error,
        "rows_error": ledger.rows_error,
        "rows_error_read": ledger.stage_errors.get(READ_STAGE, 0),
        "stages": stage_counts([st.name for st in prep.job.stages], rows_in, ledger.stage_errors),
        "error_rate": ledger.rows_error / rows_in if rows_in else 0.0,
        "max_error_rate": spec.max_error_rate,
        "input_sha256": input_sha256,
        "runs": runs,
        "updated_at": time.time(),
    }


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The line of a remote traceback that names the exception: "pkg.mod.SomeError: message".
_EXC_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Mismatch|Exceeded|Failed|Locked)): ?(.*)$"
)


def _remote_cause(text: str) -> tuple[str, str] | None:
    """(exception type, message) of the first exception in a Ray task error's text: Ray Data wraps a UDF's
    exception in UserCodeException and only the text of the worker's traceback keeps the original."""
    first = _ANSI.sub("", text).split("The above exception was the direct cause of the following exception:")[
        0
    ]
    lines = first.strip().splitlines()
    for i, line in enumerate(lines):
        match = _EXC_LINE.match(line)
        if match and not line.startswith(" "):
            message = "\n".join([match.group(2), *lines[i + 1 :]]).strip()
            return match.group(1), message
    return None


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost ShardwiseError (or the original user-code exception) inside Ray's wrappers."""
    seen = set()
    current: BaseException | None = exc
    best: BaseException = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ShardwiseError):
            return current
        remote = _remote_cause(str(current)) if type(current).__module__.startswith("ray") else None
        if remote is not None and not remote[0].startswith("ray."):
            name, message = remote
            cls = (
                getattr(errors, name.rsplit(".", 1)[-1], None)
                if name.startswith("pipeline.errors.")
                else None
            )
            if isinstance(cls, type) and issubclass(cls, ShardwiseError):
                return SpecError("", message) if cls is SpecError else cls(message)
            return JobFailed(f"the job failed: {name.rsplit('.', 1)[-1]}: {message}")
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException):
            best = cause
            current = cause
            continue
        best = current
        current = current.__cause__ or current.__context__
    return best


def _allowed_errors(spec: JobSpec, rows: int) -> int:
    """Error rows a job of `rows` rows may have: exactly at max_error_rate passes (float noise aside)."""
    return math.floor(spec.max_error_rate * rows + 1e-9)


def _warn(message: str) -> None:
    print(f"shardwise: warning: {message}", file=sys.stderr)


def run_inference(
    spec: JobSpec,
    *,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shards: int | None = None,
    verify: bool = False,
    verify_input: bool = False,
    wait_s: float = 0.0,
) -> JobResult:
    """Run (or resume) an inference job to completion. Raises ShardwiseError subclasses on failure.

    `verify` re-reads every committed part and checks its sha256 before trusting it (else sizes are
    checked); `verify_input` hashes the input files and refuses to resume over files whose content changed
    (even with the same size and mtime); `wait_s` waits that long for another run's lease on the output."""
    started = time.time()
    incremental = spec.output.mode == "incremental"
    job = _check_job(spec)
    spec = job.spec
    out = OutputDir(
        spec.output.uri, storage_options=spec.output.storage_options, compression=spec.output.compression
    )
    mode = "overwrite" if overwrite else ("resume" if incremental else spec.output.mode)
    prep = None if incremental else _plan_job(job, list_fragments(spec.input))
    # Refuse a foreign folder before writing a lease into it.
    out.claim(kind="inference", mode=mode, delete=False)
    run_id = new_run_id()
    with Lease(out, run_id, what=f"inference job {spec.name!r}", wait_s=wait_s) as lease:
        if prep is None:  # incremental: what is done is read under the lease, then only new files are planned
            previous = None if overwrite else out.claim(kind="inference", mode=mode, delete=False)
            prep = _plan_incremental(job, previous)
        for note in prep.notes:
            _warn(note)
        return _run_locked(
            prep,
            out,
            lease,
            run_id=run_id,
            started=started,
            address=address,
            mode=mode,
            progress=progress,
            max_shards=max_shards,
            verify=verify,
            verify_input=verify_input,
        )


def _check_input_content(
    prep: Prepared, previous: dict[str, Any], *, verify_input: bool
) -> dict[str, str] | None:
    """--verify-input: hash the input; refuse to resume when a file's content differs from the last hashes."""
    known = previous.get("input_sha256")
    if not verify_input:
        return known
    hashes = content_hashes(prep.spec.input, prep.fragments)
    if known:
        changed = sorted(f for f, h in hashes.items() if f in known and known[f] != h)
        if changed:
            raise FingerprintMismatch(
                f"input file(s) {changed[:5]} changed content since this output's earlier run (same listing, "
                "other bytes: an edit in place). Its committed shards were computed from the old rows; rerun "
                "with --overwrite to recompute everything, or write to another output.uri"
            )
    return hashes


def _run_locked(
    prep: Prepared,
    out: OutputDir,
    lease: Lease,
    *,
    run_id: str,
    started: float,
    address: str | None,
    mode: str,
    progress: bool,
    max_shards: int | None,
    verify: bool,
    verify_input: bool,
) -> JobResult:
    spec = prep.spec
    notes: list[str] = []
    committed = out.prepare(
        fingerprint=prep.fingerprint,
        parts=prep.parts,
        mode=mode,  # type: ignore[arg-type]
        verify=verify,
        notes=notes,
    )
    for note in notes:
        _warn(note)
    previous = out.read_manifest() or {}
    input_sha256 = _check_input_content(prep, previous, verify_input=verify_input)
    incremental = prep.files is not None
    planned = {s.shard_id for s in prep.shards}
    # An incremental output keeps the shards of earlier runs: they count, but are not planned again.
    kept = {k: v for k, v in committed.items() if k not in planned} if incremental else {}
    committed = {k: v for k, v in committed.items() if k in planned}
    todo = [s for s in prep.shards if s.shard_id not in committed]
    if max_shards is not None:
        todo = todo[:max_shards]
    runs = list(previous.get("runs", [])) + [
        {"run_id": run_id, "started_at": started, "shards_todo": len(todo), "shards_skipped": len(committed)}
    ]
    out.clear_success()
    ledger = Ledger(out, run_id=run_id, previous={**kept, **committed})
    files_done = previous.get("files") if incremental else None

    def manifest(state: str, reason: str | None = None) -> dict[str, Any]:
        data = _manifest(prep, ledger, state=state, runs=runs, input_sha256=input_sha256, reason=reason)
        if incremental:
            # The files a run adds count as done only once all their shards are committed.
            data.update(
                mode="incremental",
                files=prep.files if state == "succeeded" else files_done or {},
                shards_total=len(kept) + len(prep.shards),
                rows_total=sum(r.rows_in for r in kept.values()) + prep.rows_total,
            )
        return data

    out.write_manifest(manifest("running"))
    rows_total = prep.rows_total + sum(r.rows_in for r in kept.values())
    allowed = _allowed_errors(spec, rows_total)
    bar = _progress(progress, total=rows_total, initial=ledger.rows_in)
    graph_stats = ""
    metrics: RunMetrics | None = None

    def progress_now() -> dict[str, Any]:
        return {
            "rows_in": ledger.rows_in,
            "rows_error": ledger.rows_error,
            "shards_done": len(ledger.done),
            "rows_run": ledger.run_rows,
            "stages": stage_counts([st.name for st in prep.job.stages], ledger.rows_in, ledger.stage_errors),
        }

    try:
        if todo:
            reused = ray_module().is_initialized()
            init_ray(address=address, num_cpus=None if address else embedded_cpus(prep.job))
            _check_capacity(prep.job, reused=reused and address is None)
            if metrics_enabled():
                metrics = RunMetrics(
                    out, run_id, _metrics_run(prep, run_id, started, len(todo)), progress_now
                )
                metrics.start(ray_module())
            graph = GraphJob(
                prep.job, out, run_id, prep.fingerprint, metrics=metrics.context() if metrics else None
            )
            ds = build_dataset(ray_module(), graph, todo)
            last_write = time.monotonic()
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                for rec_dict in batch.to_pylist():
                    rec = ShardRecord(**rec_dict)
                    if ledger.add(rec) and bar is not None:
                        bar.update(rec.rows_in)
                        bar.set_postfix(errors=ledger.rows_error, refresh=False)
                if time.monotonic() - last_write > _MANIFEST_EVERY_S:
                    lease.check()
                    out.write_manifest(manifest("running"))
                    last_write = time.monotonic()
                if ledger.rows_error > allowed:
                    break  # the job can no longer pass; stop spending compute on it
            graph_stats = ds.stats()
        ledger.flush()
    except BaseException as e:  # noqa: BLE001 - Ray wraps user errors; report the cause in one paragraph
        cause = _root_cause(e)
        secrets = secret_values(spec_to_dict(spec))
        if isinstance(e, KeyboardInterrupt):
            failure: BaseException = e
        elif isinstance(cause, ShardwiseError):
            scrubbed = scrub(str(cause), secrets)
            failure = cause if scrubbed == str(cause) else type(cause)(scrubbed)  # type: ignore[call-arg]
        else:
            failure = JobFailed(f"the job failed: {type(cause).__name__}: {scrub(str(cause), secrets)}")
        runs[-1]["finished_at"] = time.time()
        state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        try:
            ledger.flush()
            out.write_manifest(manifest(state, reason=str(failure)))
            _write_run_log(
                out,
                run_id=run_id,
                started=started,
                wall=time.time() - started,
                state=state,
                reason=str(failure),
                shards_run=len(ledger.done) - len(kept) - len(committed),
                files_added=[],
            )
        except Exception:  # noqa: BLE001 - the original failure is what the user must see
            pass
        if metrics is not None:
            metrics.finish(
                state=state,
                reason=str(failure),
                figures={
                    **_run_figures(ledger, started),
                    "rows_error_run": None,  # the ledger counts errors per output, not per run
                    "shards_run": len(ledger.done) - len(kept) - len(committed),
                },
            )
        if failure is e:
            raise
        raise failure from e
    finally:
        if bar is not None:
            bar.close()

    # The records on storage are the truth: check every planned shard's record against its part file.
    lease.check()
    records = {k: v for k, v in out.read_records().items() if k in planned or k in kept}
    good, bad = out.verified(records, fingerprint=prep.fingerprint)
    leftover = [good[k] for k in out.single_records if k in good]
    if len(leftover) > 0:
        out.compact(leftover, tag=f"{run_id}-final")  # single records of earlier runs or retried tasks
    ledger = Ledger(out, run_id=run_id, previous=good)
    this_run = [r for r in good.values() if r.run_id == run_id]
    ledger.run_rows = sum(r.rows_in for r in this_run)
    wall = time.time() - started
    runs[-1].update(finished_at=time.time(), wall_s=wall, rows_run=ledger.run_rows)
    missing = sorted(planned - set(good))
    state, reason = "succeeded", None
    if ledger.rows_error > allowed:
        state = "failed"
        reason = (
            f"{ledger.rows_error} of {ledger.rows_in} rows failed ({ledger.rows_error / max(ledger.rows_in, 1):.2%}), "
            f"above max_error_rate {spec.max_error_rate:.2%} (at most {allowed} of {rows_total} rows). See the "
            f"error records in {spec.output.uri}/_errors/ (stage, error_type, message per row); fix the input or "
            "raise max_error_rate"
        )
    elif bad:
        state = "failed"
        reason = (
            f"{len(bad)} shard(s) did not verify after this run ("
            + "; ".join(f"{k}: {why}" for k, why in sorted(bad.items())[:3])
            + "): something else changed the output while the job ran. Rerun to compute them again"
        )
    elif missing and max_shards is None:
        state = "failed"
        reason = (
            f"{len(missing)} shard(s) produced no commit record (e.g. {missing[:3]}); rerun to resume them"
        )
    elif missing:
        state = "partial"
    manifest_data = manifest(state, reason=reason)
    out.write_manifest(manifest_data)
    if metrics is not None:
        metrics.finish(
            state=state,
            reason=reason,
            figures={
                **_run_figures(ledger, started),
                "rows_error_run": sum(r.rows_error for r in this_run),
                "shards_run": len(this_run),
            },
        )
    _write_run_log(
        out,
        run_id=run_id,
        started=started,
        wall=wall,
        state=state,
        shards_run=len(this_run),
        rows_ok=sum(r.rows_ok for r in this_run),
        rows_error=sum(r.rows_error for r in this_run),
        files_added=list(prep.files_added),
        files_removed=list(prep.files_removed),
    )
    result = JobResult(
        spec.output.uri,
        state,
        len(prep.shards),
        len(todo),
        len(committed),
        ledger.rows_in,
        ledger.rows_ok,
        ledger.rows_error,
        wall,
        run_id,
        rows_run=ledger.run_rows,
        manifest=manifest_data,
        notes=prep.notes + notes,
        graph_stats=graph_stats,
    )
    if state == "failed":
        if ledger.rows_error > allowed:
            raise ErrorRateExceeded(reason or "too many error rows")
        raise JobFailed(reason or "the job failed")
    if state == "succeeded":
        out.write_success()
    return result


def _metrics_run(prep: Prepared, run_id: str, started: float, shards_todo: int) -> dict[str, Any]:
    """run.json of the run's metrics (pipeline.metrics): the job and its stages as this run plans them."""
    return {
        "run_id": run_id,
        "name": prep.spec.name,
        "started_at": started,
        "rows_total": prep.rows_total,
        "shards_total": len(prep.shards),
        "shards_todo": shards_todo,
        "stages": [
            {
                "name": s.name,
                "task": s.task_name,
                "unit": unit_of(s.task)[0],
                "replicas": list(s.replicas),
                "batch_size": s.batch_size,
                "max_batch_tokens": s.max_batch_tokens,
                "num_gpus": s.num_gpus,
                "num_cpus": s.cpus,
            }
            for s in prep.job.stages
        ],
    }


def _run_figures(ledger: Ledger, started: float) -> dict[str, Any]:
    wall = time.time() - started
    return {
        "wall_s": wall,
        "rows_run": ledger.run_rows,
        "rows_per_s": ledger.run_rows / wall if wall > 0 else 0.0,
    }


def _write_run_log(out: OutputDir, *, run_id: str, **figures: Any) -> None:
    """`_runs/<run id>.json`: one record per finished run (when, what it added, its counts, its wall time),
    which `status` lists: the history of an output that grows run by run."""
    record = {"run_id": run_id, "finished_at": time.time(), **figures}
    out.write_bytes(f"_runs/{run_id}.json", json.dumps(record, sort_keys=True).encode())


def _check_capacity(job: BoundJob, *, reused: bool = False) -> None:
    """Refuse a job whose replica pools cannot all start on the cluster: Ray would wait for them forever.
    `reused`: the cluster is one this process started earlier (for another job), not sized for this one."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_cpus = min_cpus(job)
    need_gpus = sum(s.replicas[0] * s.num_gpus for s in job.stages)
    if need_cpus > cpus + 1e-9 or need_gpus > gpus + 1e-9:
        pools = ", ".join(
            f"{s.name}: {s.replicas[0]} × ({s.cpus:g} CPU, {s.num_gpus:g} GPU)" for s in job.stages
        )
        raise JobFailed(
            f"the cluster has {cpus:g} CPUs and {gpus:g} GPUs, but the stages' replica pools need {need_cpus:g} "
            f"CPUs (with one read task) and {need_gpus:g} GPUs at their minimum size ({pools}); lower "
            "stages[*].replicas, num_cpus or num_gpus, or add nodes"
            + (
                ". This process's Ray was started earlier (by an earlier job or fine-tune) and is not sized for "
                "this one: run the job in a new process, or call ray.shutdown() first so shardwise starts a "
                "cluster sized for it"
                if reused
                else ""
            )
        )


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def ray_module() -> Any:
    import ray

    return ray


def _progress(enabled: bool, *, total: int, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="rows",
        file=sys.stderr,
        dynamic_ncols=True,
        desc="shardwise",
        smoothing=0.1,
    )
