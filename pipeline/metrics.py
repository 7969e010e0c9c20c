"""Job metrics: what every step of an inference run did, recorded while it runs, written into the output.

Workers record one event per (block, CPU step) and one per micro-batch of a replica's forward, in memory,
and send them with one small call per block to the run's sink actor (`num_cpus=0`: it never
takes a CPU the graph's sizing counts on). The driver drains the sink every few seconds and writes, in
the folder shardwise owns (local or any fsspec URI, through `OutputDir`):

    <output>/_metrics/runtime/<run_id>/
        run.json                    the run: job name, start, planned rows and shards, stages (task, unit, pool)
        events-<seq:06d>.parquet    worker events (EVENT_SCHEMA), one file per flush (every 30 s and at the end)
        progress-<seq:06d>.parquet  the driver's progress samples (PROGRESS_SCHEMA), same flushes
        live.json                   recent per-stage rates, rewritten every drain (`shardwise status --watch`)
        summary.json                at the end of the run (succeeded, failed, interrupted or partial): `summarise`
                                    of its events plus the driver's counts

A resume is a new run and gets its own folder; `--overwrite` deletes `_metrics/` with the rest of shardwise's
files. A killed driver loses what it had not flushed (at most ~30 s) and writes no summary: `summarise(
read_events(out, run_id))` gives the same figures from what is there.

Event rows (`step`, per stage s; the counts add up as the tests check):

    read            rows read from the shard (stage null); rows_error: rows that could not be read
    preprocess[s]   rows not in error when it starts; rows_error: rows it failed
    forward[s]      one event per micro-batch: its rows (summed over a block: preprocess rows − errors),
                    real_units = sum of the rows' lengths, padded_units = rows × the longest (tasks that
                    pad; vision tasks group equal shapes, audio tasks with `batching: group` too: no padding)
    postprocess[s]  rows not in error when it starts (forward rows − forward errors); rows_error: rows it
                    failed (including a rare MissingOutput, whose error record says step=forward)
    commit          every row of the shard (= the commit record's rows_in); rows_error: error records

A length is what the task's runner counts (`UNITS`): tokens for text tasks (windows × tokens for
question-answering and token-classification with stride), pixels for vision tasks, samples for audio
waveforms (frames for feature-matrix models). Worker clocks are the nodes' clocks. A Ray task that is
retried records its events again: events count work done, commit records count rows once.

Metrics are best-effort: a failing sink or Ray metrics call is logged and never fails a row or the job.
They also go to Ray's metrics (`ray.util.metrics`, exported by each node's metrics agent to Prometheus):
`shardwise_rows` (Counter; job, stage, step, outcome ok|error), `shardwise_forward_seconds` (Histogram per
micro-batch; job, stage), `shardwise_units` (Counter; job, stage, unit, kind real|padded).

`SHARDWISE_METRICS=0` in the driver's environment turns all of it off (used to measure its cost:
`bench/metrics_overhead.py`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.block import ERR_STEP, ERR_TYPE, SHARD
from pipeline.commit import OutputDir, parquet_bytes

__all__ = [
    "ENV",
    "EVENT_SCHEMA",
    "FLUSH_ENV",
    "PROGRESS_SCHEMA",
    "RUNTIME",
    "UNITS",
    "MetricsContext",
    "Recorder",
    "RunMetrics",
    "Sink",
    "enabled",
    "events_table",
    "list_runs",
    "queue_depth",
    "rates",
    "read_events",
    "read_live",
    "read_progress",
    "read_run",
    "read_summary",
    "summarise",
    "unit_of",
]

log = logging.getLogger(__name__)

RUNTIME = "_metrics/runtime"
FORMAT = 1
ENV = "SHARDWISE_METRICS"
# The driver drains the sink this often (live.json, status --watch) ...
DRAIN_EVERY_S = 5.0
# ... and writes an events/progress file this often: a long job gets ~120 small files an hour, and a killed
# driver loses at most this much. SHARDWISE_METRICS_FLUSH_S overrides it (the driver-kill test uses 1 s).
FLUSH_EVERY_S = 30.0
FLUSH_ENV = "SHARDWISE_METRICS_FLUSH_S"
# live.json's rates are over the events of this last window.
LIVE_WINDOW_S = 30.0
# The driver waits at most this long for the sink actor to start (else the run goes without metrics).
_START_TIMEOUT_S = 60.0
# A worker waits at most this long for the sink to take a block's events, then drops them.
_SEND_TIMEOUT_S = 10.0
STEPS = ("read", "preprocess", "forward", "postprocess", "commit")

EVENT_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("stage", pa.string()),
        ("step", pa.string()),
        ("shard", pa.string()),
        ("worker", pa.string()),
        ("t_start", pa.float64()),
        ("seconds", pa.float64()),
        ("rows", pa.int64()),
        ("rows_error", pa.int64()),
        ("real_units", pa.int64()),
        ("padded_units", pa.int64()),
        ("unit", pa.string()),
        ("error_types", pa.string()),
    ]
)
_STAGE_COUNTS = pa.struct(
    [("stage", pa.string()), ("rows_in", pa.int64()), ("rows_ok", pa.int64()), ("rows_error", pa.int64())]
)
PROGRESS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("t", pa.float64()),
        ("rows_in", pa.int64()),
        ("rows_error", pa.int64()),
        ("shards_done", pa.int64()),
        ("rows_run", pa.int64()),
        ("stages", pa.list_(_STAGE_COUNTS)),
    ]
)

# Task → (what runner.length counts, whether a micro-batch is padded to its longest row). Vision runners
# forward one group per image shape (no padding); audio runners pad only with `batching: pad` or a model
# that takes an attention mask ("runner": read the runner's `pad`). Other tasks: ("units", True).
UNITS: dict[str, tuple[str, bool | str]] = {
    "text-classification": ("tokens", True),
    "token-classification": ("tokens", True),
    "question-answering": ("tokens", True),
    "text-generation": ("tokens", True),
    "summarization": ("tokens", True),
    "translation": ("tokens", True),
    "image-classification": ("pixels", False),
    "object-detection": ("pixels", False),
    "image-segmentation": ("pixels", False),
    "depth-estimation": ("pixels", False),
    "audio-classification": ("samples", "runner"),
    "automatic-speech-recognition": ("samples", "runner"),
}


def enabled() -> bool:
    """Metrics are on unless SHARDWISE_METRICS is 0/false/off/no in the driver's environment."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def unit_of(task: Any, runner: Any = None, features: Any = None) -> tuple[str, bool]:
    """(unit, pads) of a task's lengths (`task`: the Task, or its name). A task outside `UNITS` (a plugin)
    may declare `length_unit` (and `length_pads`); `runner` settles the audio tasks' padding, and a
    feature-matrix audio model's rows (no `lengths`) count frames rather than samples."""
    name = task if isinstance(task, str) else getattr(task, "name", "")
    unit, pads = UNITS.get(name, (getattr(task, "length_unit", "units"), getattr(task, "length_pads", True)))
    if pads == "runner":
        pads = bool(getattr(runner, "pad", True))
        if features is not None and "lengths" not in features:
            unit = "frames"
    return unit, bool(pads)


# -------------------------------------------------------------------------------------------------------
# Worker side


@dataclass(frozen=True)
class MetricsContext:
    """What a worker needs to report: the run's sink actor (a handle), the run and the job's name."""

    sink: Any
    run_id: str
    job: str


_WORKER: list[str] = []
_RAY_METRICS: dict[str, Any] = {}


def worker_id() -> str:
    """The replica's actor id in an actor, else `<pid>@<host>` (cached per process)."""
    if not _WORKER:
        actor = None
        try:
            import ray

            actor = ray.get_runtime_context().get_actor_id()
        except Exception:  # noqa: BLE001 - outside Ray (a test) there is no runtime context
            pass
        _WORKER.append(actor or f"{os.getpid()}@{socket.gethostname()}")
    return _WORKER[0]


def _ray_metrics() -> dict[str, Any]:
    """The process's Ray metrics, created once (Ray registers a metric per name and process)."""
    if not _RAY_METRICS:
        from ray.util.metrics import Counter, Histogram

        _RAY_METRICS["rows"] = Counter(
            "shardwise_rows",
            description="Rows a shardwise step worked on, by outcome.",
            tag_keys=("job", "stage", "step", "outcome"),
        )
        _RAY_METRICS["forward"] = Histogram(
            "shardwise_forward_seconds",
            description="Seconds of one micro-batch's forward on a replica.",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
            tag_keys=("job", "stage"),
        )
        _RAY_METRICS["units"] = Counter(
            "shardwise_units",
            description="Lengths (tokens, pixels, samples) of forwarded rows: real, and padded to the micro-batch.",
            tag_keys=("job", "stage", "unit", "kind"),
        )
    return _RAY_METRICS


def record_ray_metrics(job: str, events: Sequence[tuple[Any, ...]]) -> None:
    """Add a block's events to Ray's metrics: one increment per (stage, step, outcome), one histogram
    observation per micro-batch."""
    m = _ray_metrics()
    rows: dict[tuple[str, str, str], int] = defaultdict(int)
    units: dict[tuple[str, str, str], int] = defaultdict(int)
    for ev in events:
        stage, step, seconds, n, err = ev[1] or "", ev[2], ev[6], ev[7], ev[8]
        rows[(stage, step, "ok")] += n - err
        rows[(stage, step, "error")] += err
        if step == "forward":
            m["forward"].observe(seconds, tags={"job": job, "stage": stage})
            units[(stage, ev[11], "real")] += ev[9]
            units[(stage, ev[11], "padded")] += ev[10]
    for (stage, step, outcome), n in rows.items():
        if n:
            m["rows"].inc(n, tags={"job": job, "stage": stage, "step": step, "outcome": outcome})
    for (stage, unit, kind), n in units.items():
        if n:
            m["units"].inc(n, tags={"job": job, "stage": stage, "unit": unit, "kind": kind})


class Recorder:
    """A block's events, in memory until `send` (one call to the sink per block). Every method is a no-op
    when metrics are off (`ctx` None)."""

    def __init__(self, ctx: MetricsContext | None) -> None:
        self.ctx = ctx
        self.events: list[tuple[Any, ...]] = []

    def step(
        self, stage: str | None, step: str, t_start: float, before: pa.Table | None, after: pa.Table
    ) -> None:
        """One CPU step from the block before and after it: rows it worked on (not in error before; all rows
        for read and commit), rows it failed and their error types."""
        if self.ctx is None:
            return
        try:
            self._step(stage, step, t_start, before, after)
        except Exception as e:  # noqa: BLE001 - metrics are best-effort; the rows are not
            log.debug("metrics: could not record %s/%s: %s", stage, step, e)

    def _step(
        self, stage: str | None, step: str, t_start: float, before: pa.Table | None, after: pa.Table
    ) -> None:
        assert self.ctx is not None
        seconds = time.time() - t_start
        after_err = pc.is_valid(after.column(ERR_STEP))
        if before is None or step == "commit":  # read: every row is new; commit: every row is written
            new = after_err
            rows = after.num_rows
        else:
            fresh = pc.is_null(before.column(ERR_STEP))
            new = pc.and_(fresh, after_err)
            rows = pc.sum(fresh.cast(pa.int64())).as_py() or 0
        failed = pc.sum(new.cast(pa.int64())).as_py() or 0
        types = None
        if failed:
            counts = pc.value_counts(after.column(ERR_TYPE).filter(new)).to_pylist()
            types = json.dumps({c["values"]: c["counts"] for c in counts}, sort_keys=True)
        shard = ",".join(pc.unique(after.column(SHARD)).to_pylist()) if SHARD in after.column_names else ""
        self.events.append(
            (
                self.ctx.run_id,
                stage,
                step,
                shard,
                worker_id(),
                t_start,
                seconds,
                rows,
                failed,
                None,
                None,
                None,
                types,
            )
        )

    def forward(
        self,
        stage: str,
        *,
        shard: str,
        t_start: float,
        seconds: float,
        lengths: Sequence[int],
        errors: Sequence[tuple[str, str] | None],
        unit: str,
        pads: bool,
    ) -> None:
        """One micro-batch of a replica: its rows' lengths and errors (None for a row that has an output)."""
        if self.ctx is None:
            return
        real = int(sum(lengths))
        padded = len(lengths) * int(max(lengths, default=0)) if pads else real
        failed = [e[0] for e in errors if e is not None]
        types = None
        if failed:
            types = json.dumps({t: failed.count(t) for t in sorted(set(failed))}, sort_keys=True)
        self.events.append(
            (
                self.ctx.run_id,
                stage,
                "forward",
                shard,
                worker_id(),
                t_start,
                seconds,
                len(lengths),
                len(failed),
                real,
                padded,
                unit,
                types,
            )
        )

    def send(self) -> None:
        """Hand the block's events to the sink and to Ray's metrics. Never raises."""
        if self.ctx is None or not self.events:
            return
        events, self.events = self.events, []
        try:
            import ray

            # Waited for (a round trip per block, ~1 ms), so a block's events are in the sink before its
            # rows reach the driver, and the driver's last drain misses none.
            ray.get(self.ctx.sink.add.remote(events), timeout=_SEND_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - metrics are best-effort; the rows are not
            log.debug("metrics sink call failed: %s", e)
        try:
            record_ray_metrics(self.ctx.job, events)
        except Exception as e:  # noqa: BLE001
            log.debug("ray metrics failed: %s", e)


class Sink:
    """The run's event buffer, an actor created by the driver (`num_cpus=0`) and drained by it."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def add(self, events: list[tuple[Any, ...]]) -> None:
        self.events.extend(events)

    def drain(self) -> list[tuple[Any, ...]]:
        events, self.events = self.events, []
        return events


# -------------------------------------------------------------------------------------------------------
# Driver side


def events_table(events: Iterable[Sequence[Any]]) -> pa.Table:
    rows = list(events)
    return pa.Table.from_arrays(
        [pa.array([r[i] for r in rows], f.type) for i, f in enumerate(EVENT_SCHEMA)], schema=EVENT_SCHEMA
    )


@dataclass
class RunMetrics:
    """The driver's half: creates the sink, drains it from a thread, writes the run's files.

    `progress` is called at each drain for the driver's counts: {rows_in, rows_error, shards_done,
    rows_run, stages: {name: {rows_in, rows_ok, rows_error}}}."""

    out: OutputDir
    run_id: str
    run: dict[str, Any]
    progress: Callable[[], dict[str, Any]]
    sink: Any = None
    _seq: int = 0
    _pending: list[tuple[Any, ...]] = field(default_factory=list)
    _samples: list[dict[str, Any]] = field(default_factory=list)
    _recent: deque[tuple[Any, ...]] = field(default_factory=deque)
    _last_flush: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    drained: int = 0

    @property
    def folder(self) -> str:
        return f"{RUNTIME}/{self.run_id}"

    def context(self) -> MetricsContext | None:
        return MetricsContext(self.sink, self.run_id, str(self.run.get("name") or "")) if self.sink else None

    def start(self, ray: Any) -> None:
        """Create the sink and start draining. A failure here turns metrics off for the run, nothing more."""
        try:
            self.out.write_bytes(
                f"{self.folder}/run.json", json.dumps({"format": FORMAT, **self.run}).encode()
            )
            self.sink = ray.remote(num_cpus=0, max_restarts=0)(Sink).remote()
            # Up before the first block: a worker never waits for it to start.
            ray.get(self.sink.drain.remote(), timeout=_START_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - best-effort
            log.warning("job metrics are off for this run: %s", e)
            self.sink = None
            return
        self._last_flush = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="shardwise-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(min(DRAIN_EVERY_S, _flush_every_s())):
            self.drain()

    def drain(self, *, flush: bool = False) -> None:
        """Fetch the sink's events, sample progress, rewrite live.json; write files when due (or `flush`)."""
        import ray

        with self._lock:
            try:
                events = (
                    ray.get(self.sink.drain.remote(), timeout=_SEND_TIMEOUT_S)
                    if self.sink is not None
                    else []
                )
            except Exception as e:  # noqa: BLE001
                log.debug("metrics drain failed: %s", e)
                events = []
            now = time.time()
            self.drained += len(events)
            self._pending.extend(events)
            self._recent.extend(events)
            while self._recent and self._recent[0][5] + self._recent[0][6] < now - LIVE_WINDOW_S:
                self._recent.popleft()
            try:
                self._samples.append({"run_id": self.run_id, "t": now, **_sample(self.progress())})
                self.out.write_bytes(f"{self.folder}/live.json", json.dumps(self._live(now)).encode())
                if flush or time.monotonic() - self._last_flush >= _flush_every_s():
                    self._flush()
            except Exception as e:  # noqa: BLE001
                log.warning("could not write job metrics: %s", e)

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending and not self._samples:
            return
        name = f"{self._seq:06d}.parquet"
        self.out.write_bytes(
            f"{self.folder}/events-{name}", parquet_bytes(events_table(self._pending), "zstd")
        )
        progress = pa.Table.from_pylist(self._samples, schema=PROGRESS_SCHEMA)
        self.out.write_bytes(f"{self.folder}/progress-{name}", parquet_bytes(progress, "zstd"))
        self._seq += 1
        self._pending, self._samples = [], []

    def _live(self, now: float) -> dict[str, Any]:
        table = events_table(self._recent)
        stages = {}
        depth = queue_depth(table)
        for s in self.run.get("stages") or []:
            name = s["name"]
            fwd = _of(table, name, "forward")
            post = _of(table, name, "postprocess")
            workers = set(fwd.column("worker").to_pylist())
            real, padded = _sum(fwd, "real_units"), _sum(fwd, "padded_units")
            stages[name] = {
                "rows_per_s": (_sum(post, "rows") - _sum(post, "rows_error")) / LIVE_WINDOW_S,
                "busy_share": _sum(fwd, "seconds") / (len(workers) * LIVE_WINDOW_S) if workers else None,
                "waiting_forward": _last_depth(depth, name, "forward"),
                "waiting_postprocess": _last_depth(depth, name, "postprocess"),
                "padding_efficiency": real / padded if padded else None,
            }
        return {"run_id": self.run_id, "t": now, "window_s": LIVE_WINDOW_S, "stages": stages}

    def finish(self, *, state: str, reason: str | None, figures: dict[str, Any]) -> None:
        """Stop draining, drain the last events, write everything and summary.json. Never raises."""
        if self.sink is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        try:
            self.drain(flush=True)
            events = read_events(self.out, self.run_id)
            summary = {
                "format": FORMAT,
                "run_id": self.run_id,
                "name": self.run.get("name"),
                "state": state,
                "reason": reason,
                "started_at": self.run.get("started_at"),
                "finished_at": time.time(),
                **figures,
                **summarise(events, run=self.run),
            }
            self.out.write_bytes(f"{self.folder}/summary.json", json.dumps(summary, indent=1).encode())
        except Exception as e:  # noqa: BLE001 - the job's result stands without its metrics
            log.warning("could not write the job metrics summary: %s", e)
        finally:
            try:
                import ray

                ray.kill(self.sink)
            except Exception:  # noqa: BLE001
                pass
            self.sink = None


def _flush_every_s() -> float:
    try:
        return float(os.environ.get(FLUSH_ENV) or FLUSH_EVERY_S)
    except ValueError:
        return FLUSH_EVERY_S


def _sample(p: dict[str, Any]) -> dict[str, Any]:
    stages = [{"stage": k, **v} for k, v in (p.get("stages") or {}).items()]
    return {
        **{k: int(p.get(k) or 0) for k in ("rows_in", "rows_error", "shards_done", "rows_run")},
        "stages": stages,
    }


# -------------------------------------------------------------------------------------------------------
# Reading (the report and `status --watch` use these)


def _out(out: str | OutputDir, storage_options: dict[str, Any] | None) -> OutputDir:
    return out if isinstance(out, OutputDir) else OutputDir(out, storage_options=storage_options)


def list_runs(out: str | OutputDir, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The run ids with a metrics folder, oldest first."""
    return sorted(_out(out, storage_options).sizes(RUNTIME))


def _read_tables(out: OutputDir, run_id: str | None, prefix: str, schema: pa.Schema) -> pa.Table:
    runs = list_runs(out) if run_id is None else [run_id]
    tables = []
    for run in runs:
        names = sorted(
            n for n in out.sizes(f"{RUNTIME}/{run}") if n.startswith(prefix) and n.endswith(".parquet")
        )
        for name in names:
            try:
                data = out.read_bytes(posixpath.join(RUNTIME, run, name))
                tables.append(pq.read_table(io.BytesIO(data)).select(schema.names).cast(schema))
            except (OSError, pa.ArrowInvalid, KeyError) as e:
                log.warning(
                    "skipping unreadable metrics file %s/%s/%s/%s: %s", out.uri, RUNTIME, run, name, e
                )
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_events(
    out: str | OutputDir, run_id: str | None = None, *, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """Events of one run (every run when None), EVENT_SCHEMA, sorted by t_start."""
    table = _read_tables(_out(out, storage_options), run_id, "events-", EVENT_SCHEMA)
    return table.sort_by("t_start") if table.num_rows else table


def read_progress(
    out: str | OutputDir, run_id: str | None = None, *, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """The driver's progress samples of one run (every run when None), PROGRESS_SCHEMA, sorted by t."""
    table = _read_tables(_out(out, storage_options), run_id, "progress-", PROGRESS_SCHEMA)
    return table.sort_by("t") if table.num_rows else table


def _read_json(out: OutputDir, rel: str) -> dict[str, Any] | None:
    try:
        data = json.loads(out.read_bytes(rel))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_run(
    out: str | OutputDir, run_id: str, *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """run.json of a run (None if absent)."""
    return _read_json(_out(out, storage_options), f"{RUNTIME}/{run_id}/run.json")


def read_live(
    out: str | OutputDir, run_id: str, *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """live.json of a run (None if absent)."""
    return _read_json(_out(out, storage_options), f"{RUNTIME}/{run_id}/live.json")


def read_summary(
    out: str | OutputDir, run_id: str | None = None, *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """summary.json of a run (the newest run when None); None if it has none (running, or a killed driver)."""
    o = _out(out, storage_options)
    if run_id is None:
        runs = list_runs(o)
        if not runs:
            return None
        run_id = runs[-1]
    return _read_json(o, f"{RUNTIME}/{run_id}/summary.json")


# -------------------------------------------------------------------------------------------------------
# Figures


def _of(events: pa.Table, stage: str | None, step: str) -> pa.Table:
    stage_mask = (
        pc.is_null(events.column("stage")) if stage is None else pc.equal(events.column("stage"), stage)
    )
    return events.filter(pc.and_(stage_mask, pc.equal(events.column("step"), step)))


def _sum(table: pa.Table, column: str) -> float:
    return pc.sum(table.column(column)).as_py() or 0


def _stage_order(events: pa.Table, run: dict[str, Any] | None) -> list[str]:
    names = [s["name"] for s in (run or {}).get("stages") or []]
    for name in events.column("stage").to_pylist():
        if name is not None and name not in names:
            names.append(name)
    return names


def queue_depth(events: pa.Table) -> pa.Table:
    """Rows waiting between steps over time, per stage: `forward` = preprocessed rows not yet in a
    micro-batch of the stage's replica pool; `postprocess` = forwarded rows not yet in a postprocess task.
    One row per change: t (epoch s), stage, between, rows. (Rows between a postprocess and the next stage's
    preprocess never wait: both run in the same CPU task.)"""
    changes: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    cols = {
        c: events.column(c).to_pylist() for c in ("stage", "step", "t_start", "seconds", "rows", "rows_error")
    }
    for stage, step, t, s, n, err in zip(*cols.values(), strict=True):
        if stage is None:
            continue
        if step == "preprocess":
            changes[(stage, "forward")].append((t + s, n - err))
        elif step == "forward":
            changes[(stage, "forward")].append((t, -n))
            changes[(stage, "postprocess")].append((t + s, n - err))
        elif step == "postprocess":
            changes[(stage, "postprocess")].append((t, -n))
    ts, stages, betweens, rows = [], [], [], []
    for (stage, between), deltas in changes.items():
        level = 0
        for t, d in sorted(deltas, key=lambda td: (td[0], td[1] < 0)):  # at one instant, arrivals first
            level += d
            ts.append(t)
            stages.append(stage)
            betweens.append(between)
            rows.append(level)
    return pa.table(
        {
            "t": pa.array(ts, pa.float64()),
            "stage": pa.array(stages, pa.string()),
            "between": pa.array(betweens, pa.string()),
            "rows": pa.array(rows, pa.int64()),
        }
    )


def _last_depth(depth: pa.Table, stage: str, between: str) -> int | None:
    rows = depth.filter(
        pc.and_(pc.equal(depth.column("stage"), stage), pc.equal(depth.column("between"), between))
    )
    return int(rows.column("rows")[-1].as_py()) if rows.num_rows else None


def rates(events: pa.Table, *, bin_s: float = 10.0) -> pa.Table:
    """Rows per second over time: the rows of the events that ended in each `bin_s` bin, per (stage, step).
    Columns: t (the bin's start, epoch s), stage, step, rows, rows_per_s."""
    if not events.num_rows:
        return pa.table(
            {
                "t": pa.array([], pa.float64()),
                "stage": pa.array([], pa.string()),
                "step": pa.array([], pa.string()),
                "rows": pa.array([], pa.int64()),
                "rows_per_s": pa.array([], pa.float64()),
            }
        )
    ends = pc.add(events.column("t_start"), events.column("seconds")).to_pylist()
    t0 = min(events.column("t_start").to_pylist())
    bins: dict[tuple[float, str | None, str], int] = defaultdict(int)
    for end, stage, step, n in zip(
        ends,
        events.column("stage").to_pylist(),
        events.column("step").to_pylist(),
        events.column("rows").to_pylist(),
        strict=True,
    ):
        bins[(t0 + bin_s * int((end - t0) // bin_s), stage, step)] += n
    keys = sorted(bins, key=lambda k: (k[0], k[1] or "", STEPS.index(k[2]) if k[2] in STEPS else 99))
    return pa.table(
        {
            "t": pa.array([k[0] for k in keys], pa.float64()),
            "stage": pa.array([k[1] for k in keys], pa.string()),
            "step": pa.array([k[2] for k in keys], pa.string()),
            "rows": pa.array([bins[k] for k in keys], pa.int64()),
            "rows_per_s": pa.array([bins[k] / bin_s for k in keys], pa.float64()),
        }
    )


def summarise(events: pa.Table, *, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Figures of a run from its events (see summary.json in the module docstring). `run` (run.json) gives
    the stage order, tasks, units and the start (for `first_commit_s`); without it, the first event's start."""
    import numpy as np

    out: dict[str, Any] = {
        "events": events.num_rows,
        "steps": [],
        "stages": {},
        "errors": [],
        "first_commit_s": None,
    }
    if not events.num_rows:
        return out
    starts = np.asarray(events.column("t_start").to_numpy(zero_copy_only=False), dtype=float)
    ends = starts + np.asarray(events.column("seconds").to_numpy(zero_copy_only=False), dtype=float)
    t0 = float(starts.min())
    window = max(float(ends.max()) - t0, 1e-9)
    out["active_s"] = window
    started = (run or {}).get("started_at") or t0
    order = _stage_order(events, run)
    tasks = {s["name"]: s for s in (run or {}).get("stages") or []}
    for stage, steps in (
        [(None, ("read",))]
        + [(s, ("preprocess", "forward", "postprocess")) for s in order]
        + [(None, ("commit",))]
    ):
        for step in steps:
            ev = _of(events, stage, step)
            if ev.num_rows:
                out["steps"].append(
                    {
                        "stage": stage,
                        "step": step,
                        "events": ev.num_rows,
                        "rows": int(_sum(ev, "rows")),
                        "rows_error": int(_sum(ev, "rows_error")),
                        "seconds": float(_sum(ev, "seconds")),
                    }
                )
    commits = _of(events, None, "commit")
    if commits.num_rows:
        first = pc.min(pc.add(commits.column("t_start"), commits.column("seconds"))).as_py()
        out["first_commit_s"] = first - started
    depth = queue_depth(events)
    for name in order:
        pre, fwd, post = (_of(events, name, step) for step in ("preprocess", "forward", "postprocess"))
        seconds = np.asarray(fwd.column("seconds").to_numpy(zero_copy_only=False), dtype=float)
        real, padded = int(_sum(fwd, "real_units")), int(_sum(fwd, "padded_units"))
        busy: dict[str, float] = defaultdict(float)
        for worker, s in zip(fwd.column("worker").to_pylist(), seconds.tolist(), strict=True):
            busy[worker] += s
        units = [u for u in fwd.column("unit").to_pylist() if u]
        rows_ok = int(_sum(post, "rows") - _sum(post, "rows_error"))
        waiting = {}
        for between in ("forward", "postprocess"):
            d = depth.filter(
                pc.and_(pc.equal(depth.column("stage"), name), pc.equal(depth.column("between"), between))
            )
            waiting[between] = int(pc.max(d.column("rows")).as_py() or 0) if d.num_rows else 0
        out["stages"][name] = {
            "task": tasks.get(name, {}).get("task"),
            "unit": units[0] if units else tasks.get(name, {}).get("unit"),
            "rows_in": int(_sum(pre, "rows")),
            "rows_ok": rows_ok,
            "rows_error": int(_sum(pre, "rows_error") + _sum(fwd, "rows_error") + _sum(post, "rows_error")),
            "rows_per_s": rows_ok / window,
            "forward": {
                "micro_batches": fwd.num_rows,
                "rows": int(_sum(fwd, "rows")),
                "rows_per_batch_mean": _sum(fwd, "rows") / fwd.num_rows if fwd.num_rows else None,
                "seconds": float(seconds.sum()),
                "latency_s": {
                    "mean": float(seconds.mean()),
                    "p50": float(np.percentile(seconds, 50)),
                    "p95": float(np.percentile(seconds, 95)),
                    "max": float(seconds.max()),
                }
                if seconds.size
                else None,
                "real_units": real,
                "padded_units": padded,
                "padding_efficiency": real / padded if padded else None,
            },
            "replicas": len(busy),
            "busy_share": float(seconds.sum()) / (len(busy) * window) if busy else None,
            "replica_busy": {w: s / window for w, s in sorted(busy.items())},
            "waiting_max": waiting,
        }
    errors: dict[tuple[str | None, str, str], int] = defaultdict(int)
    for stage, step, types in zip(
        events.column("stage").to_pylist(),
        events.column("step").to_pylist(),
        events.column("error_types").to_pylist(),
        strict=True,
    ):
        if types and step != "commit":
            for error_type, n in json.loads(types).items():
                errors[(stage, step, error_type)] += n
    out["errors"] = [
        {"stage": k[0], "step": k[1], "error_type": k[2], "rows": n}
        for k, n in sorted(errors.items(), key=lambda kv: (-kv[1], kv[0][0] or "", kv[0][1], kv[0][2]))
    ]
    return out
