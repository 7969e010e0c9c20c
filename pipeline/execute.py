"""Run an inference job: spec → plan → Ray Data graph → commit → manifest.

    from_items(shards, one block each)
      → map_batches(read_preprocess)        CPU tasks: read the shard's rows, tokenize/decode (batched)
      → map_batches(Replica, actor pool)    `replicas` actors, `num_gpus` each: pad + forward only
      → map_batches(postprocess_commit)     CPU tasks: labels/spans/..., write part files, commit record
      → the driver consumes commit records: progress, manifest, error-rate check

Every map takes the whole block (`batch_size=None`) and Ray Data's block splitting is off, so a block is
a shard all the way down and one shard gives one `part-<shard>.parquet`. Streaming execution gives
backpressure: only a few shards are in flight per stage, whatever the dataset size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.block import (
    ERR_MSG,
    ERR_STAGE,
    ERR_TYPE,
    FEATURE,
    FILE,
    ID,
    OUTPUT,
    READ_ERROR,
    ROW,
    SHARD,
    set_errors,
)
from pipeline.cluster import init_ray
from pipeline.commit import OUTPUT_FORMAT, Ledger, OutputDir, ShardRecord, error_schema
from pipeline.errors import (
    ErrorRateExceeded,
    FingerprintMismatch,
    JobFailed,
    ShardwiseError,
    SourceError,
    SpecError,
)
from pipeline.lease import Lease
from pipeline.locations import check_output_location
from pipeline.plan import Shard, fingerprint, plan_shards
from pipeline.redact import redact, scrub, secret_values
from pipeline.sources import (
    Fragment,
    content_hashes,
    describe_files,
    input_schema,
    list_files,
    list_fragments,
    read_shard,
    resolve_format,
)
from pipeline.spec import JobSpec, StageSpec, spec_to_dict
from pipeline.tensors import decode_tensors, encode_tensors

__all__ = ["JobResult", "Prepared", "init_ray", "preflight", "run_inference"]

log = logging.getLogger(__name__)

# CPU (logical) reserved by each read/preprocess and commit task. Replicas reserve their own.
_TASK_CPUS = 1.0
_COMMIT_CPUS = 0.5
# How often the driver refreshes _manifest.json while a job runs.
_MANIFEST_EVERY_S = 5.0
# Resident memory of a worker that has imported torch + transformers + a tokenizer (measured ~280 MiB).
_TASK_BASE_MEMORY = 384 * 1024 * 1024


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

    @property
    def rows_per_s(self) -> float:
        return self.rows_run / self.wall_s if self.wall_s > 0 else 0.0


# -------------------------------------------------------------------------------------------------------
# Ray


def embedded_cpus(spec: JobSpec) -> int:
    """Logical CPUs for the embedded cluster: all replicas at their max plus one read and one commit task
    always fit, so no pool can wait forever for a CPU (the reason to go above the physical count)."""
    stage = spec.stage
    _, hi = stage.replica_range()
    per_replica = replica_cpus(stage)
    need = math.ceil(hi * per_replica + _TASK_CPUS + _COMMIT_CPUS)
    return max(os.cpu_count() or 1, need)


def replica_cpus(stage: StageSpec) -> float:
    return stage.num_cpus if stage.num_cpus is not None else 1.0


# -------------------------------------------------------------------------------------------------------
# Stage functions (run in Ray workers). Loaded objects are cached per worker process.


@functools.lru_cache(maxsize=8)
def _loaded(role: str, task_name: str, model: str, revision: str | None, params: str) -> Any:
    """The task's preprocessor or postprocessor, loaded once per worker process (Ray reuses workers)."""
    from models.loading import resolve_model
    from models.registry import get_task

    task = get_task(task_name)
    model_dir = resolve_model(model, revision=revision)
    parsed = task.parse_params(json.loads(params), key="params")
    if role == "preprocess":
        return task.load_preprocessor(model_dir, parsed)
    return task.load_postprocessor(model_dir, parsed)


def _stage_key(stage: StageSpec) -> tuple[str, str, str | None, str]:
    return (stage.task, stage.model, stage.revision, json.dumps(spec_to_dict(stage.params), sort_keys=True))


def _isolate(
    fn: Callable[[dict[str, list[Any]]], list[Any]], columns: dict[str, list[Any]], n: int
) -> list[Any]:
    """Run a batched row function; if the batch raises, rerun row by row so one bad row costs only itself."""
    try:
        out = fn(columns)
        if len(out) != n:
            raise RuntimeError(f"returned {len(out)} results for {n} rows")
        return out
    except Exception:  # noqa: BLE001
        if n == 1:
            raise
        results = []
        for i in range(n):
            try:
                out = fn({k: v[i : i + 1] for k, v in columns.items()})
                if len(out) != 1:  # a row without a result (or with two) must not shift the rows after it
                    raise RuntimeError(f"returned {len(out)} results for 1 rows")
                results.extend(out)
            except Exception as e:  # noqa: BLE001
                from models.registry import RowError

                results.append(RowError(type(e).__name__, str(e) or repr(e)))
        return results


def read_preprocess(batch: pa.Table, *, job: dict[str, Any]) -> pa.Table:
    """Read each shard in the block and preprocess its rows (one output block per input block)."""
    from models.registry import RowError, get_task

    spec: JobSpec = job["spec"]
    stage = spec.stage
    task = get_task(stage.task)
    preprocess = _loaded("preprocess", *job["stage_key"])
    out = []
    for shard_json in batch.column("shard").to_pylist():
        shard = Shard.from_dict(json.loads(shard_json))
        table = read_shard(spec.input, shard.fragment, shard.start, shard.stop, columns=job["read_columns"])
        n = table.num_rows
        read_errors = table.column(READ_ERROR).to_pylist()
        table = table.drop_columns([READ_ERROR])
        table = table.append_column(SHARD, pa.array([shard.shard_id] * n, pa.string()))
        table = table.append_column(FILE, pa.array([shard.fragment.rel] * n, pa.string()))
        for name in (ERR_STAGE, ERR_TYPE, ERR_MSG):
            table = table.append_column(name, pa.nulls(n, pa.string()))
        table = set_errors(
            table,
            "read",
            [
                (("RowTooLarge" if "input.max_row_bytes" in e else "ParseError"), e)
                if e is not None
                else None
                for e in read_errors
            ],
        )
        ok = [i for i, e in enumerate(read_errors) if e is None]
        ok_rows = pa.array(ok, pa.int64())  # typed: an empty list would be a null-typed index array
        columns = {name: table.column(col).take(ok_rows).to_pylist() for name, col in stage.inputs.items()}
        columns[ID] = table.column(ID).take(ok_rows).to_pylist()  # registry.ROW_ID: seeds per-row randomness
        features: list[Any] = [None] * n
        errors: list[tuple[str, str] | None] = [None] * n
        if ok:
            try:
                results = _isolate(preprocess, columns, len(ok))
            except Exception as e:  # noqa: BLE001 - a single row that raised
                results = [RowError(type(e).__name__, str(e) or repr(e))]
            for i, res in zip(ok, results, strict=True):
                if isinstance(res, RowError):
                    errors[i] = (res.error_type, res.message)
                else:
                    features[i] = res
        table = set_errors(table, "preprocess", errors)
        keep = set(job["carry_columns"]) | {SHARD, ID, ROW, FILE, ERR_STAGE, ERR_TYPE, ERR_MSG}
        table = table.select([c for c in table.column_names if c in keep])
        for name, column in encode_tensors(features, prefix=FEATURE).items():
            table = table.append_column(name, column)
        del task
        out.append(table)
    return pa.concat_tables(out, promote_options="permissive") if len(out) > 1 else out[0]


def postprocess_commit(batch: pa.Table, *, job: dict[str, Any]) -> pa.Table:
    """Postprocess each shard's rows, split predictions from error records, commit the shard."""
    from models.registry import get_task

    spec: JobSpec = job["spec"]
    stage = spec.stage
    task = get_task(stage.task)
    postprocess = _loaded("postprocess", *job["stage_key"])
    schema: pa.Schema = job["output_schema"]
    out_dir: OutputDir = job["output"]
    records = []
    shards = batch.column(SHARD).to_pylist()
    for shard_id in dict.fromkeys(shards):
        idx = [i for i, s in enumerate(shards) if s == shard_id]
        table = batch.take(idx)
        outputs = decode_tensors(table, prefix=OUTPUT)
        features = decode_tensors(table, prefix=FEATURE)
        stages = table.column(ERR_STAGE).to_pylist()
        inputs = {
            name: table.column(col).to_pylist()
            for name, col in stage.inputs.items()
            if name in task.postprocess_inputs
        }
        preds: list[dict[str, Any]] = []
        ok_idx: list[int] = []
        errors: list[tuple[str, str] | None] = [None] * table.num_rows
        missing: list[tuple[str, str] | None] = [None] * table.num_rows
        for i in range(table.num_rows):
            if stages[i] is not None:
                continue
            if outputs[i] is None:  # the replica's forward gave nothing for it: a forward error
                missing[i] = ("MissingOutput", "the replica returned no output for this row")
                continue
            try:
                row = postprocess(
                    outputs[i], inputs={k: v[i] for k, v in inputs.items()}, features=features[i] or {}
                )
            except Exception as e:  # noqa: BLE001
                errors[i] = (type(e).__name__, str(e) or repr(e))
                continue
            preds.append(row)
            ok_idx.append(i)
        table = set_errors(table, "forward", missing)
        table = set_errors(table, "postprocess", errors)
        # Typed indices: a shard whose rows all failed has none, and an empty list is null-typed.
        predictions = _predictions_table(table.take(pa.array(ok_idx, pa.int64())), preds, schema, job)
        error_rows = table.filter(pa.compute.is_valid(table.column(ERR_STAGE)))
        id_column = job["id_column"]
        ids = error_rows.column(id_column if id_column is not None else ID)
        errors_table = pa.table(
            [
                ids,
                error_rows.column(FILE),
                error_rows.column(ROW),
                error_rows.column(ERR_STAGE),
                error_rows.column(ERR_TYPE),
                error_rows.column(ERR_MSG),
            ],
            schema=error_schema(pa.field(id_column, ids.type) if id_column is not None else None),
        )
        if predictions.num_rows + errors_table.num_rows != table.num_rows:  # never commit a lost row
            raise JobFailed(
                f"shard {shard_id}: {table.num_rows} rows in, but {predictions.num_rows} predictions and "
                f"{errors_table.num_rows} error records out; this is a bug in shardwise, please report it"
            )
        rec = out_dir.commit_shard(
            shard_id,
            run_id=job["run_id"],
            fingerprint=job["fingerprint"],
            predictions=predictions,
            errors=errors_table,
        )
        records.append(dataclasses.asdict(rec))
    return pa.Table.from_pylist(records)


def _predictions_table(
    rows: pa.Table, preds: list[dict[str, Any]], schema: pa.Schema, job: dict[str, Any]
) -> pa.Table:
    columns: dict[str, pa.Array] = {}
    id_column = job["id_column"]
    if id_column is None:
        columns["id"] = rows.column(ID)
    for col, name in job["keep_columns"].items():
        columns[name] = rows.column(col)
    for f in schema:
        columns[f.name] = pa.array([p.get(f.name) for p in preds], f.type)
    return pa.table(columns)


# -------------------------------------------------------------------------------------------------------
# Driver


def _read_columns(spec: JobSpec) -> list[str]:
    cols = list(spec.stage.inputs.values()) + list(spec.input.kept())
    if spec.input.id_column:
        cols.append(spec.input.id_column)
    return list(dict.fromkeys(cols))


def _keep_columns(spec: JobSpec) -> dict[str, str]:
    """Input column → output name, the id column first (under its own name unless renamed)."""
    kept = spec.input.kept_as()
    id_column = spec.input.id_column
    if id_column is None:
        return kept
    return {id_column: kept.get(id_column, id_column), **{k: v for k, v in kept.items() if k != id_column}}


def _check_columns(spec: JobSpec, schema: pa.Schema, output_schema: pa.Schema) -> None:
    names = set(schema.names)
    for task_input, col in spec.stage.inputs.items():
        if col not in names:
            raise SpecError(
                f"stages[0].inputs.{task_input}",
                f"column {col!r} is not in the input; its columns: {schema.names}",
            )
    if spec.input.id_column and spec.input.id_column not in names:
        raise SpecError(
            "input.id_column",
            f"column {spec.input.id_column!r} is not in the input; its columns: {schema.names}",
        )
    for col, name in _keep_columns(spec).items():
        if col not in names:
            raise SpecError(
                "input.keep_columns", f"column {col!r} is not in the input; its columns: {schema.names}"
            )
        if name in output_schema.names:
            raise SpecError(
                "input.keep_columns",
                f"column {col!r} would be kept as {name!r}, which is also a field the task writes; rename it in "
                f"the output with a mapping, e.g. keep_columns: {{{col}: input_{col}}}",
            )
    if spec.input.id_column is None and "id" in _keep_columns(spec).values():
        raise SpecError(
            "input.keep_columns",
            "keeps a column named 'id' but input.id_column is not set; set input.id_column: id (or rename it "
            "with keep_columns: {id: input_id})",
        )


@dataclass(frozen=True)
class Prepared:
    """A job checked before Ray starts: its input listed and planned, its model and output vetted."""

    spec: JobSpec  # input.format resolved
    task: Any
    params: Any
    output_schema: pa.Schema
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


def _check_model(model: str, *, revision: str | None, key: str) -> None:
    from models import loading

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


def _check_job(spec: JobSpec) -> tuple[JobSpec, Any, Any, pa.Schema]:
    """The task and params, that the model resolves, that the output is a safe and writable place, and the
    input's format. Nothing is planned yet."""
    from models.registry import get_task

    stage = spec.stage
    task = get_task(stage.task)
    params = task.parse_params(stage.params, key="stages[0].params")
    output_schema = task.output_schema(params)
    _check_model(stage.model, revision=stage.revision, key="stages[0].model")
    check_output_location(
        spec.output.uri,
        key="output.uri",
        protected=[("input.uri", spec.input.uri)]
        + [(f"stages[{i}].model", s.model) for i, s in enumerate(spec.stages)],
    )
    _check_writable(spec.output.uri)
    spec = dataclasses.replace(spec, input=resolve_format(spec.input))
    return spec, task, params, output_schema


def _plan_job(
    checked: tuple[JobSpec, Any, Any, pa.Schema],
    fragments: list[Fragment],
    *,
    incremental: bool = False,
    allow_no_rows: bool = False,
) -> Prepared:
    from models.loading import model_identity

    spec, task, params, output_schema = checked
    stage = spec.stage
    if fragments:
        _check_columns(spec, input_schema(spec.input, fragments[0]), output_schema)
    notes: list[str] = []
    shards = plan_shards(spec, fragments, notes=notes)
    if not shards and not (spec.input.allow_empty or allow_no_rows):
        raise SourceError(
            f"input.uri {spec.input.uri!r} has no rows ({len(fragments)} file(s), all empty); check the path or "
            "glob, or set input.allow_empty: true if an empty input is expected (the job then succeeds with "
            "no part files)"
        )
    fp, parts = fingerprint(
        spec,
        fragments,
        model_identity=model_identity(stage.model, revision=stage.revision),
        with_files=not incremental,
    )
    return Prepared(spec, task, params, output_schema, fragments, shards, fp, parts, notes)


def preflight(spec: JobSpec) -> Prepared:
    """Everything that can be checked before Ray starts: the task and params, that the model resolves, that
    the input exists, has rows and the mapped columns, and that the output is a safe, writable place."""
    checked = _check_job(spec)
    return _plan_job(checked, list_fragments(checked[0].input), incremental=spec.output.mode == "incremental")


def _plan_incremental(
    checked: tuple[JobSpec, Any, Any, pa.Schema], previous: dict[str, Any] | None
) -> Prepared:
    """Plan only the files an incremental output does not cover yet. Files already done (same path, size and
    mtime/etag) are skipped without being opened. A done file that changed is refused, naming it (its old
    predictions cannot be replaced atomically); a done file that disappeared keeps its predictions."""
    spec = checked[0]
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
    prep = _plan_job(checked, fragments, incremental=True, allow_no_rows=bool(done))
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
    from pipeline import __version__

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
    import pipeline.errors as errors

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
    checked = _check_job(spec)
    spec = checked[0]
    out = OutputDir(
        spec.output.uri, storage_options=spec.output.storage_options, compression=spec.output.compression
    )
    mode = "overwrite" if overwrite else ("resume" if incremental else spec.output.mode)
    prep = None if incremental else _plan_job(checked, list_fragments(spec.input))
    # Refuse a foreign folder before writing a lease into it.
    out.claim(kind="inference", mode=mode, delete=False)
    run_id = new_run_id()
    with Lease(out, run_id, what=f"inference job {spec.name!r}", wait_s=wait_s) as lease:
        if prep is None:  # incremental: what is done is read under the lease, then only new files are planned
            previous = None if overwrite else out.claim(kind="inference", mode=mode, delete=False)
            prep = _plan_incremental(checked, previous)
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
    stage = spec.stage
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
    try:
        if todo:
            init_ray(address=address, num_cpus=None if address else embedded_cpus(spec))
            task = prep.task
            job = {
                "spec": spec,
                "stage_key": _stage_key(stage),
                "read_columns": _read_columns(spec),
                "carry_columns": list(
                    dict.fromkeys(
                        list(_keep_columns(spec))
                        + [stage.inputs[n] for n in task.postprocess_inputs if n in stage.inputs]
                    )
                ),
                "keep_columns": _keep_columns(spec),
                "id_column": spec.input.id_column,
                "output_schema": prep.output_schema,
                "output": out,
                "run_id": run_id,
                "fingerprint": prep.fingerprint,
            }
            ds = _build_dataset(ray_module(), spec, todo, job)
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
    )
    if state == "failed":
        if ledger.rows_error > allowed:
            raise ErrorRateExceeded(reason or "too many error rows")
        raise JobFailed(reason or "the job failed")
    if state == "succeeded":
        out.write_success()
    return result


def _write_run_log(out: OutputDir, *, run_id: str, **figures: Any) -> None:
    """`_runs/<run id>.json`: one record per finished run (when, what it added, its counts, its wall time),
    which `status` lists: the history of an output that grows run by run."""
    record = {"run_id": run_id, "finished_at": time.time(), **figures}
    out.write_bytes(f"_runs/{run_id}.json", json.dumps(record, sort_keys=True).encode())


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def ray_module() -> Any:
    import ray

    return ray


def _build_dataset(ray: Any, spec: JobSpec, todo: list[Shard], job: dict[str, Any]) -> Any:
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress bar and summary replace its logs
    # A copy, current only while the graph is built: a Dataset seals the context it was created under, so
    # these settings hold for this job and the caller's own Ray Data work keeps its settings.
    ctx = DataContext.get_current().copy()
    ctx.target_max_block_size = None  # never split a block: a block is a shard, a shard is one commit
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False
    with DataContext.current(ctx):
        return _graph(ray, spec, todo, job)


def _graph(ray: Any, spec: JobSpec, todo: list[Shard], job: dict[str, Any]) -> Any:
    from ray.data import ActorPoolStrategy

    from pipeline.replica import Replica

    stage = spec.stage
    lo, hi = stage.replica_range()
    threads = (
        int(stage.num_cpus)
        if stage.num_cpus
        else (None if stage.num_gpus else max(1, (os.cpu_count() or 1) // hi))
    )
    items = [{"shard": json.dumps(s.to_dict())} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        read_preprocess,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"job": job},
        num_cpus=_TASK_CPUS,
        # Reserve memory for a shard in flight (its rows + features) on top of the worker's libraries.
        # Remote args that differ from the replica's also keep Ray Data from fusing this CPU stage into
        # the replica actor: tokenizing must run in parallel CPU tasks, not on the replica's critical path.
        memory=_TASK_BASE_MEMORY + 2 * spec.input.shard_bytes,
    )
    ds = ds.map_batches(
        Replica,
        batch_size=None,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=lo, max_size=hi),
        num_gpus=stage.num_gpus or None,
        num_cpus=replica_cpus(stage),
        fn_constructor_kwargs={
            "task": stage.task,
            "model": stage.model,
            "revision": stage.revision,
            "params": dict(stage.params),
            "device": stage.device,  # "auto" resolves inside the actor, where the GPU is visible
            "dtype": stage.dtype,
            "num_gpus": stage.num_gpus,
            "batch_size": stage.batch_size,
            "max_batch_tokens": stage.max_batch_tokens,
            "threads": threads,
        },
    )
    ds = ds.map_batches(
        postprocess_commit,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"job": job},
        num_cpus=_COMMIT_CPUS,
    )
    return ds


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
