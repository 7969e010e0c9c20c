"""The job's Ray Data graph and the functions its workers run.

    from_items(shards, one block each)
      → read + preprocess[s0]               CPU tasks: read the shard's rows, tokenize/decode (batched)
      → Replica[s0]   (actor pool)          `replicas` actors, `num_gpus` each: pad + forward only
      → postprocess[s0] + preprocess[s1]    CPU tasks: s0's fields (labels, spans, text), s1's features
      → Replica[s1]   (actor pool)
      → ...
      → postprocess[sN] + commit            CPU tasks: the last fields, part files, commit record
      → the driver consumes commit records (pipeline.execute)

Stages run in list order in one stream: each stage has its own replica pool, and every pool works on other
shards at the same time, so a chain or a fan-out runs at the pace of its slowest stage and rows are read,
decoded and committed once. CPU steps and replica pools alternate, and their remote args differ, so Ray
Data never fuses a CPU step into a replica actor (tokenizing stays off the accelerator's critical path).

Every map takes the whole block (`batch_size=None`) and block splitting is off, so a block is a shard all
the way down and one shard gives one `part-<shard>.parquet`. A row that fails in a step gets one error
(stage, step, type, message) and later steps skip it.

Workers receive the bound job (`pipeline.bind`): parsed params and schemas, never a spec to parse again.
Each CPU step and each replica micro-batch is recorded for the job metrics (`pipeline.metrics`): one event
per (block, step) or micro-batch, sent to the run's sink once per block.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from models.loading import resolve_model
from models.registry import RowError
from pipeline.bind import BoundJob, BoundStage
from pipeline.block import (
    ERR_MSG,
    ERR_STAGE,
    ERR_STEP,
    ERR_TYPE,
    ERROR_COLUMNS,
    FEATURE,
    FILE,
    ID,
    OUTPUT,
    READ_ERROR,
    ROW,
    SHARD,
    ok_rows,
    set_errors,
)
from pipeline.commit import READ_STAGE, OutputDir, error_schema
from pipeline.errors import JobFailed
from pipeline.metrics import MetricsContext, Recorder
from pipeline.plan import Shard
from pipeline.replica import Replica
from pipeline.sources import read_shard
from pipeline.tensors import decode_tensors, encode_tensors

__all__ = [
    "COMMIT_CPUS",
    "TASK_CPUS",
    "GraphJob",
    "build_dataset",
    "cpu_step",
    "embedded_cpus",
    "min_cpus",
    "replica_threads",
]

log = logging.getLogger(__name__)

# CPU (logical) reserved by each read/preprocess task and by each commit task. Replicas reserve their own.
TASK_CPUS = 1.0
COMMIT_CPUS = 0.5
# Resident memory of a worker that has imported torch + transformers + a tokenizer (measured ~280 MiB).
_TASK_BASE_MEMORY = 384 * 1024 * 1024
_ENGINE = frozenset({SHARD, ID, ROW, FILE, *ERROR_COLUMNS})


@dataclass(frozen=True)
class GraphJob:
    """What the graph's CPU steps receive: the bound job and where (and as which run) to commit."""

    job: BoundJob
    output: OutputDir
    run_id: str
    fingerprint: str
    # The run's metrics sink (pipeline.metrics); None when metrics are off.
    metrics: MetricsContext | None = None


# -------------------------------------------------------------------------------------------------------
# Sizing


def embedded_cpus(job: BoundJob) -> int:
    """Logical CPUs for the embedded cluster: every stage's replicas at their max plus one read and one commit
    task always fit, so no pool can wait forever for a CPU (the reason to go above the physical count)."""
    need = sum(s.replicas[1] * s.cpus for s in job.stages) + TASK_CPUS + COMMIT_CPUS
    return max(os.cpu_count() or 1, int(need + 0.999))


def min_cpus(job: BoundJob) -> float:
    """CPUs a job cannot start without: every pool at its minimum and one read task."""
    return sum(s.replicas[0] * s.cpus for s in job.stages) + TASK_CPUS


def replica_threads(job: BoundJob, stage: BoundStage) -> int | None:
    """Torch threads per replica: its num_cpus when set; on CPU-only replicas the node's cores split across
    all stages' replicas (so three stages on two cores do not run six threads each); else torch's default."""
    if stage.num_cpus:
        return max(1, int(stage.num_cpus))
    if stage.num_gpus:
        return None
    replicas = sum(s.replicas[1] for s in job.stages if not s.num_gpus)
    return max(1, (os.cpu_count() or 1) // max(replicas, 1))


# -------------------------------------------------------------------------------------------------------
# Worker side. Loaded processors are cached per worker process (Ray reuses workers across tasks).

_LOADED: dict[tuple[str, str], Any] = {}
_LOADED_MAX = 8


def _loaded(role: str, stage: BoundStage) -> Any:
    """The stage's preprocessor or postprocessor, loaded once per worker process."""
    key = (role, stage.key)
    if key not in _LOADED:
        if len(_LOADED) >= _LOADED_MAX:
            _LOADED.pop(next(iter(_LOADED)))
        model_dir = resolve_model(stage.model, revision=stage.revision)
        load = stage.task.load_preprocessor if role == "preprocess" else stage.task.load_postprocessor
        _LOADED[key] = load(model_dir, stage.params)
    return _LOADED[key]


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
                results.append(RowError(type(e).__name__, str(e) or repr(e)))
        return results


def _select(table: pa.Table, keep: frozenset[str], *, features: bool) -> pa.Table:
    return table.select(
        [c for c in table.column_names if c in _ENGINE or c in keep or (features and c.startswith(FEATURE))]
    )


def read_block(batch: pa.Table, job: BoundJob) -> pa.Table:
    """Read every shard of the block: the input columns the job reads, plus the engine columns."""
    tables = []
    for shard_json in batch.column("shard").to_pylist():
        shard = Shard.from_dict(json.loads(shard_json))
        table = read_shard(
            job.spec.input, shard.fragment, shard.start, shard.stop, columns=list(job.read_columns)
        )
        n = table.num_rows
        read_errors = table.column(READ_ERROR).to_pylist()
        table = table.drop_columns([READ_ERROR])
        table = table.append_column(SHARD, pa.array([shard.shard_id] * n, pa.string()))
        table = table.append_column(FILE, pa.array([shard.fragment.rel] * n, pa.string()))
        for name in ERROR_COLUMNS:
            table = table.append_column(name, pa.nulls(n, pa.string()))
        table = set_errors(
            table,
            None,
            "read",
            [
                (("RowTooLarge" if "input.max_row_bytes" in e else "ParseError"), e)
                if e is not None
                else None
                for e in read_errors
            ],
        )
        tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def preprocess(table: pa.Table, job: BoundJob, stage: BoundStage) -> pa.Table:
    """The stage's CPU preprocess over the rows not in error; appends its feature columns."""
    ok = ok_rows(table)
    n = table.num_rows
    index = pa.array(ok, pa.int64())  # typed: an empty list would be a null-typed index array
    features: list[Any] = [None] * n
    errors: list[tuple[str, str] | None] = [None] * n
    if ok:
        columns = {
            name: table.column(col).take(index).to_pylist() for name, col in stage.input_columns.items()
        }
        columns[ID] = table.column(ID).take(index).to_pylist()  # registry.ROW_ID: seeds per-row randomness
        # Outside the try: a preprocessor that cannot load is not a row's error (the task fails with it).
        preprocess_fn = _loaded("preprocess", stage)
        try:
            results = _isolate(preprocess_fn, columns, len(ok))
        except Exception as e:  # noqa: BLE001 - _isolate re-raises only for a single row
            results = [RowError(type(e).__name__, str(e) or repr(e))]
        for i, res in zip(ok, results, strict=True):
            if isinstance(res, RowError):
                errors[i] = (res.error_type, res.message)
            else:
                features[i] = res
    table = set_errors(table, stage.name, "preprocess", errors)
    table = _select(table, job.carry_after_preprocess[stage.index], features=False)
    for name, column in encode_tensors(features, prefix=FEATURE).items():
        table = table.append_column(name, column)
    return table


def postprocess(table: pa.Table, job: BoundJob, stage: BoundStage) -> pa.Table:
    """The stage's CPU postprocess: raw outputs → its fields, as `__p.<stage>.<field>` columns."""
    task = stage.task
    postprocess_fn = _loaded("postprocess", stage)
    outputs = decode_tensors(table, prefix=OUTPUT)
    features = decode_tensors(table, prefix=FEATURE)
    steps = table.column(ERR_STEP).to_pylist()
    inputs = {
        name: table.column(col).to_pylist()
        for name, col in stage.input_columns.items()
        if name in task.postprocess_inputs
    }
    n = table.num_rows
    rows: list[dict[str, Any] | None] = [None] * n
    errors: list[tuple[str, str] | None] = [None] * n
    missing: list[tuple[str, str] | None] = [None] * n
    for i in range(n):
        if steps[i] is not None:
            continue
        if outputs[i] is None:  # the replica's forward gave nothing for it: a forward error
            missing[i] = ("MissingOutput", "the replica returned no output for this row")
            continue
        try:
            rows[i] = postprocess_fn(
                outputs[i], inputs={k: v[i] for k, v in inputs.items()}, features=features[i] or {}
            )
        except Exception as e:  # noqa: BLE001
            errors[i] = (type(e).__name__, str(e) or repr(e))
    table = set_errors(table, stage.name, "forward", missing)
    table = set_errors(table, stage.name, "postprocess", errors)
    steps = table.column(ERR_STEP).to_pylist()
    columns = {}
    for field in stage.output_schema:
        values = [
            row.get(field.name) if row is not None and steps[i] is None else None
            for i, row in enumerate(rows)
        ]
        try:
            columns[stage.prediction_columns[field.name]] = pa.array(values, field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise JobFailed(
                f"stage {stage.name!r} ({stage.task_name}) returned values of field {field.name!r} that are not "
                f"{field.type}: {e}; this is a bug in the task, please report it"
            ) from e
    table = _select(table, job.carry_after_postprocess[stage.index], features=False)
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


def commit(table: pa.Table, graph: GraphJob) -> pa.Table:
    """Split each shard's rows into predictions and error records and commit the shard."""
    job = graph.job
    records = []
    shards = table.column(SHARD).to_pylist()
    for shard_id in dict.fromkeys(shards):
        rows = table.take(pa.array([i for i, s in enumerate(shards) if s == shard_id], pa.int64()))
        failed = pc.is_valid(rows.column(ERR_STEP))
        predictions = _predictions(rows.filter(pc.invert(failed)), job)
        error_rows = rows.filter(failed)
        ids = error_rows.column(job.id_column if job.id_column is not None else ID)
        errors = pa.table(
            [
                ids,
                error_rows.column(FILE),
                error_rows.column(ROW),
                error_rows.column(ERR_STAGE),
                error_rows.column(ERR_STEP),
                error_rows.column(ERR_TYPE),
                error_rows.column(ERR_MSG),
            ],
            schema=error_schema(pa.field(job.id_column, ids.type) if job.id_column is not None else None),
        )
        if predictions.num_rows + errors.num_rows != rows.num_rows:  # never commit a lost row
            raise JobFailed(
                f"shard {shard_id}: {rows.num_rows} rows in, but {predictions.num_rows} predictions and "
                f"{errors.num_rows} error records out; this is a bug in shardwise, please report it"
            )
        by_stage = Counter(
            s if s is not None else READ_STAGE for s in error_rows.column(ERR_STAGE).to_pylist()
        )
        rec = graph.output.commit_shard(
            shard_id,
            run_id=graph.run_id,
            fingerprint=graph.fingerprint,
            predictions=predictions,
            errors=errors,
            errors_by_stage=dict(by_stage),
        )
        records.append(asdict(rec))
    return pa.Table.from_pylist(records)


def _predictions(rows: pa.Table, job: BoundJob) -> pa.Table:
    """id (when the input has no id column), the kept columns, then the written stages' fields: flat for a
    single-stage job, one struct column per stage otherwise."""
    columns: dict[str, Any] = {}
    if job.id_column is None:
        columns["id"] = rows.column(ID)
    for col, name in job.keep_columns:
        columns[name] = rows.column(col)
    for stage in job.written:
        fields = [rows.column(c).combine_chunks() for c in stage.prediction_columns.values()]
        if job.multi:
            columns[stage.name] = pa.StructArray.from_arrays(fields, fields=list(stage.output_schema))
        else:
            columns.update(zip(stage.output_schema.names, fields, strict=True))
    return pa.table(columns)


def cpu_step(batch: pa.Table, *, graph: GraphJob, read: bool, post: int | None, pre: int | None) -> pa.Table:
    """One CPU task of the graph: [read] → [postprocess of stage `post`] → [preprocess of stage `pre`];
    with no next stage, the shard is committed and the task returns its commit records. Each step's event
    goes to the run's metrics (pipeline.metrics), one call per block."""
    job = graph.job
    rec = Recorder(graph.metrics)
    table = batch
    if read:
        t = time.time()
        table = read_block(batch, job)
        rec.step(None, "read", t, None, table)
    if post is not None:
        t, before = time.time(), table
        table = postprocess(table, job, job.stages[post])
        rec.step(job.stages[post].name, "postprocess", t, before, table)
    if pre is not None:
        t, before = time.time(), table
        table = preprocess(table, job, job.stages[pre])
        rec.step(job.stages[pre].name, "preprocess", t, before, table)
        rec.send()
        return table
    t = time.time()
    records = commit(table, graph)
    rec.step(None, "commit", t, None, table)
    rec.send()
    return records


def _named(name: str) -> Callable[..., pa.Table]:
    """`cpu_step` under a name that says what the step does (Ray Data names operators and workers after it)."""

    def step(batch: pa.Table, **kwargs: Any) -> pa.Table:
        return cpu_step(batch, **kwargs)

    step.__name__ = step.__qualname__ = name
    return step


def _replica_class(stage: BoundStage) -> type:
    """The Replica class under the stage's name, so each pool is told apart in stats and process titles."""
    return type(f"Replica[{stage.name}]", (Replica,), {"__module__": Replica.__module__})


# -------------------------------------------------------------------------------------------------------
# Driver side


def build_dataset(ray: Any, graph: GraphJob, todo: list[Shard]) -> Any:
    """The lazy Dataset of commit records for the shards `todo` (executed by iterating it)."""
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
        return _graph(ray, graph, todo)


def _graph(ray: Any, graph: GraphJob, todo: list[Shard]) -> Any:
    from ray.data import ActorPoolStrategy

    job = graph.job
    stages = job.stages
    # Reserve memory for a shard in flight (its rows + features) on top of the worker's libraries.
    memory = _TASK_BASE_MEMORY + 2 * job.spec.input.shard_bytes
    items = [{"shard": json.dumps(s.to_dict())} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _named(f"read+preprocess[{stages[0].name}]"),
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={"graph": graph, "read": True, "post": None, "pre": 0},
        num_cpus=TASK_CPUS,
        memory=memory,
    )
    for k, stage in enumerate(stages):
        lo, hi = stage.replicas
        ds = ds.map_batches(
            _replica_class(stage),
            batch_size=None,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=lo, max_size=hi),
            num_gpus=stage.num_gpus or None,
            num_cpus=stage.cpus,
            fn_constructor_kwargs={
                "stage": stage,
                "threads": replica_threads(job, stage),
                "metrics": graph.metrics,
            },
        )
        last = k == len(stages) - 1
        name = f"postprocess[{stage.name}]+" + ("commit" if last else f"preprocess[{stages[k + 1].name}]")
        ds = ds.map_batches(
            _named(name),
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"graph": graph, "read": False, "post": k, "pre": None if last else k + 1},
            num_cpus=COMMIT_CPUS if last else TASK_CPUS,
            **({} if last else {"memory": memory}),
        )
    return ds
