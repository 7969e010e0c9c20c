"""What the four-system benchmarks (text classification, image classification, ASR, generation) share: the
config fields and command line every one of them takes, the embedded Ray cluster, the shardwise job and
the naive Ray Data job, the timing of the in-process systems, the warm-up and repeat loop, and the
JSON payload with its agreement figures.

A benchmark module keeps only what is particular to it: its model and data, the shardwise stage, the
`transformers.pipeline` call, the naive Ray Data UDF and the model-only loop. It hands those to
`run_benchmark` as one `Systems`.

Steady-state rates (startup excluded) are measured the same way for every benchmark:
    shardwise    rows after the first committed shard / (last commit − first commit)   [manifest times]
    pipeline     rows / time of the call over all inputs, after construction and a warm-up call
    naive_ray    rows after the first batch / (last batch done − first batch done)      [a column the
                 UDF adds; the final write is outside the window]
    model_only   rows / time of the forward loop, after load, input preparation and one warm-up batch
`startup_s` is then wall − rows / steady (see bench.common).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from bench.common import (
    CpuMeter,
    SystemRun,
    agreement,
    committed_shards,
    format_table,
    machine_info,
    steady_rate,
    summarize,
    write_results,
)

__all__ = [
    "RAY_SYSTEMS",
    "BenchInputs",
    "HarnessConfig",
    "InProcess",
    "Systems",
    "add_common_args",
    "check_agreement",
    "config_from_args",
    "embedded_ray",
    "pair_agreement",
    "print_report",
    "read_by_id",
    "run_benchmark",
    "run_in_process",
    "run_model_only",
    "run_naive_ray",
    "run_shardwise",
    "shardwise_spec",
    "sync",
    "write_inputs",
]

RAY_SYSTEMS = ("shardwise", "naive_ray")
Dtype = Literal["float32", "bfloat16", "float16"]


def _cores() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class HarnessConfig:
    """The fields every benchmark config has; each benchmark's config subclasses it with its defaults."""

    rows: int = 1
    batch_size: int = 8
    repeats: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    # None: float32 on CPU (what the pipeline uses by default), bfloat16 on CUDA (what shardwise picks).
    dtype: Dtype | None = None
    threads: int = field(default_factory=_cores)
    seed: int = 0
    shard_rows: int = 1
    # shardwise stage max_batch_tokens; None: batch_size only.
    max_batch_tokens: int | None = None
    # Rows of the warm-up pass each system gets before it is timed (Ray jobs: a whole small job, so worker
    # processes exist and have imported torch).
    warmup_rows: int = 0
    systems: tuple[str, ...] = ()
    min_agreement: float = 0.99
    # Niceness of the embedded Ray cluster's workers when the benchmark starts it. Ray's default is 15, which
    # on a machine with other work makes every Ray-hosted system yield to anything at niceness 0 (the
    # in-process systems included), so the comparison would measure the scheduler, not the systems.
    # None keeps Ray's default.
    ray_worker_niceness: int | None = 0

    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "bfloat16" if self.device == "cuda" else "float32"

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.resolved_dtype())

    @property
    def num_gpus(self) -> int:
        return 1 if self.device == "cuda" else 0


C = TypeVar("C", bound=HarnessConfig)


@dataclass(frozen=True)
class BenchInputs:
    """The inputs every system reads: `items` in memory (in-process systems), the same rows as Parquet
    (Ray systems), and the first `warmup_rows` of them as a second Parquet file for the Ray warm-up jobs."""

    model_dir: Path
    items: list[Any]
    input_path: Path
    warmup_path: Path
    work_dir: Path


def write_inputs(path: Path, column: str, values: Sequence[Any], *, binary: bool = False) -> Path:
    """A Parquet file of (id int64 0..n-1, `column` string or binary)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    kind = pa.binary() if binary else pa.string()
    pq.write_table(
        pa.table({"id": pa.array(range(len(values)), pa.int64()), column: pa.array(values, kind)}), path
    )
    return path


def bench_inputs(
    model_dir: Path,
    items: Sequence[Any],
    *,
    column: str,
    work_dir: Path,
    warmup_rows: int,
    binary: bool = False,
) -> BenchInputs:
    items = list(items)
    name = f"{column}.parquet"
    return BenchInputs(
        model_dir=Path(model_dir),
        items=items,
        input_path=write_inputs(work_dir / "input" / name, column, items, binary=binary),
        warmup_path=write_inputs(
            work_dir / "warmup" / name, column, items[: max(1, warmup_rows)], binary=binary
        ),
        work_dir=work_dir,
    )


def read_by_id(uri: Path, n: int, fills: Mapping[str, Any]) -> list[list[Any]]:
    """Each column of `fills` from a Parquet output directory, as a list indexed by input row id 0..n-1
    (a row missing from the output keeps the column's fill value)."""
    import pyarrow.dataset as pads

    columns = list(fills)
    table = pads.dataset(
        str(uri), format="parquet", exclude_invalid_files=True, ignore_prefixes=["_", "."]
    ).to_table(columns=["id", *columns])
    ids = table.column("id").to_pylist()
    out = []
    for column in columns:
        values = [fills[column]] * n
        for i, value in zip(ids, table.column(column).to_pylist(), strict=True):
            values[int(i)] = value
        out.append(values)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------------------
# The systems: shardwise, naive Ray Data, the in-process pipeline call, the model-only loop

Outputs = tuple[list[Any], list[float]]  # (labels or texts, scores: empty where the task has none)


def shardwise_spec(
    cfg: HarnessConfig, *, job: str, stage: Mapping[str, Any], input_path: Path, out_uri: Path
) -> Any:
    """A one-stage shardwise job: `stage` (name, task, model, inputs, params) with the benchmark's batch
    size, one replica, the dtype and device; on a CPU with fewer threads than cores, a CPU reservation
    (the replica's torch threads follow it: pipeline.execute)."""
    from pipeline.spec import parse_spec

    stage = {
        **stage,
        "batch_size": cfg.batch_size,
        "replicas": 1,
        "dtype": cfg.resolved_dtype(),
        "device": cfg.device,
        "num_gpus": cfg.num_gpus,
    }
    if cfg.max_batch_tokens is not None:
        stage["max_batch_tokens"] = cfg.max_batch_tokens
    if cfg.device == "cpu" and cfg.threads != _cores():
        stage["num_cpus"] = float(cfg.threads)
    return parse_spec(
        {
            "name": job,
            "input": {"uri": str(input_path), "id_column": "id", "shard_rows": cfg.shard_rows},
            "stages": [stage],
            "output": {"uri": str(out_uri), "mode": "overwrite"},
        }
    )


def run_shardwise(
    cfg: HarnessConfig, spec: Any, *, read: Callable[[Path, int], Outputs], extra: Mapping[str, Any] = {}
) -> SystemRun:
    """Run `spec`, read the manifest for the rows and the commit times, and the outputs with `read`."""
    from pipeline.execute import run_inference

    started = time.time()
    result = run_inference(spec, overwrite=True, progress=False)
    wall = time.time() - started
    shards = committed_shards(result.output_uri, result.run_id)
    return _ray_run(
        "shardwise",
        started=started,
        wall=wall,
        events=[(s["committed_at"], s["rows_in"]) for s in shards],
        read=lambda rows: read(Path(result.output_uri), rows),
        window=("first_commit_s", "last_commit_s"),
        extra={"shards": len(shards), "shard_rows": cfg.shard_rows, "rows_error": result.rows_error, **extra},
    )


def run_naive_ray(
    cfg: HarnessConfig,
    udf: type,
    *,
    model_dir: Path,
    input_path: Path,
    out_dir: Path,
    read: Callable[[Path, int], Outputs],
    udf_kwargs: Mapping[str, Any] = {},
) -> SystemRun:
    """What a Ray Data user writes first: read_parquet → map_batches(`udf`, one actor, batch_size) →
    write_parquet, on the running cluster. `udf(model_dir, device=, dtype=, threads=, **udf_kwargs)` must
    return an `id` column and a `batch_done_at` column (time.time() when its batch finished)."""
    import pyarrow.dataset as pads
    import ray

    started = time.time()
    ds = ray.data.read_parquet(str(input_path))
    ds = ds.map_batches(
        udf,
        compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_args=(str(model_dir),),
        fn_constructor_kwargs={
            "device": cfg.device,
            "dtype": cfg.resolved_dtype(),
            "threads": cfg.threads,
            **udf_kwargs,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=0 if cfg.device == "cuda" else 1,
        num_gpus=cfg.num_gpus,
    )
    ds.write_parquet(str(out_dir))
    wall = time.time() - started
    table = pads.dataset(str(out_dir), format="parquet").to_table(columns=["id", "batch_done_at"])
    done, counts = np.unique(table.column("batch_done_at").to_numpy(), return_counts=True)
    return _ray_run(
        "naive_ray",
        started=started,
        wall=wall,
        events=list(zip(done.tolist(), counts.tolist(), strict=True)),
        read=lambda rows: read(out_dir, rows),
        window=("first_batch_s", "last_batch_s"),
    )


def _ray_run(
    name: str,
    *,
    started: float,
    wall: float,
    events: Sequence[tuple[float, int]],
    read: Callable[[int], Outputs],
    window: tuple[str, str],
    extra: Mapping[str, Any] = {},
) -> SystemRun:
    """A Ray system's run from its (time, rows) events: rows, steady rate between the first and the last
    event (rows / wall with fewer than two), and the events' times after `started` as `window`'s keys."""
    events = sorted(events)
    rows = sum(r for _, r in events)
    steady = steady_rate(events)
    labels, scores = read(rows)
    return SystemRun(
        name,
        rows,
        wall,
        steady if steady is not None else rows / wall,
        labels,
        scores,
        extra={
            **extra,
            window[0]: round(events[0][0] - started, 3) if events else None,
            window[1]: round(events[-1][0] - started, 3) if events else None,
        },
    )


def run_in_process(
    name: str,
    cfg: HarnessConfig,
    *,
    construct: Callable[[], Callable[[Sequence[Any]], Sequence[Any]]],
    items: Sequence[Any],
    parse: Callable[[Sequence[Any]], Outputs],
    extra: Mapping[str, Any] = {},
) -> SystemRun:
    """An in-process system (the `transformers.pipeline` call, or the loop a user writes instead):
    `construct()` returns a callable over a list of items; it gets a warm-up call on the first
    `cfg.warmup_rows` items, then one timed call over all of them."""
    t0 = time.perf_counter()
    call = construct()
    t1 = time.perf_counter()
    if cfg.warmup_rows:
        call(items[: cfg.warmup_rows])
    sync(cfg.device)
    t2 = time.perf_counter()
    out = call(items)
    sync(cfg.device)
    t3 = time.perf_counter()
    del call
    gc.collect()
    labels, scores = parse(out)
    n = len(items)
    return SystemRun(
        name,
        n,
        t3 - t0,
        n / (t3 - t2),
        labels,
        scores,
        extra={**extra, "construct_s": round(t1 - t0, 3), "warmup_s": round(t2 - t1, 3)},
    )


class ModelOnly(Protocol):
    """A model-only loop: `load` the model, `prepare` its batches on the device (untimed), `forward` one
    batch (timed), `collect` the outputs per input row after the clock."""

    def load(self) -> Any: ...
    def prepare(self, model: Any) -> list[Any]: ...
    def forward(self, model: Any, batch: Any) -> Any: ...
    def collect(self, model: Any, batches: list[Any], outputs: list[Any]) -> Outputs: ...


def run_model_only(cfg: HarnessConfig, loop: ModelOnly, *, rows: int) -> SystemRun:
    """An upper bound: inputs prepared on the device before the clock; load + warm-up + forwards timed."""
    import torch

    t0 = time.perf_counter()
    model = loop.load()
    t1 = time.perf_counter()
    batches = loop.prepare(model)
    with torch.inference_mode():
        t2 = time.perf_counter()
        if batches:
            loop.forward(model, batches[-1])  # warm-up: the last (for sorted inputs, the shortest) batch
        sync(cfg.device)
        t3 = time.perf_counter()
        outputs = [loop.forward(model, b) for b in batches]
        sync(cfg.device)
        t4 = time.perf_counter()
    labels, scores = loop.collect(model, batches, outputs)
    del model, batches, outputs
    gc.collect()
    return SystemRun(
        "model_only",
        rows,
        (t1 - t0) + (t4 - t2),
        rows / (t4 - t3),
        labels,
        scores,
        extra={
            "load_s": round(t1 - t0, 3),
            "warmup_s": round(t3 - t2, 3),
            "prepare_s (untimed)": round(t2 - t1, 3),
        },
    )


@dataclass(frozen=True)
class InProcess:
    """An in-process system for `run_in_process`: `construct`, `parse` and extra figures."""

    construct: Callable[[], Callable[[Sequence[Any]], Sequence[Any]]]
    parse: Callable[[Sequence[Any]], Outputs]
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Systems:
    """What a benchmark hands `run_benchmark`: its shardwise job (`job`, `stage`, outputs read with
    `read`), its naive Ray Data UDF (outputs read with `read_naive`, default `read`), its in-process systems
    by name and its model-only loop."""

    inputs: BenchInputs
    job: str
    stage: Mapping[str, Any]
    read: Callable[[Path, int], Outputs]
    udf: type
    in_process: Mapping[str, InProcess]
    model_only: ModelOnly
    udf_kwargs: Mapping[str, Any] = field(default_factory=dict)
    read_naive: Callable[[Path, int], Outputs] | None = None
    shardwise_extra: Mapping[str, Any] = field(default_factory=dict)

    def spec(self, cfg: HarnessConfig, *, input_path: Path, out_uri: Path) -> Any:
        return shardwise_spec(cfg, job=self.job, stage=self.stage, input_path=input_path, out_uri=out_uri)

    def run(self, cfg: HarnessConfig, system: str, tag: str, input_path: Path | None) -> SystemRun:
        """Run `system` once over all inputs (`input_path` None) or over the Parquet file at `input_path`."""
        inp = self.inputs
        path = input_path or inp.input_path
        if system == "shardwise":
            spec = self.spec(cfg, input_path=path, out_uri=inp.work_dir / f"out-shardwise-{tag}")
            return run_shardwise(cfg, spec, read=self.read, extra=self.shardwise_extra)
        if system == "naive_ray":
            return run_naive_ray(
                cfg,
                self.udf,
                model_dir=inp.model_dir,
                input_path=path,
                out_dir=inp.work_dir / f"out-naive-{tag}",
                read=self.read_naive or self.read,
                udf_kwargs=self.udf_kwargs,
            )
        if system == "model_only":
            return run_model_only(cfg, self.model_only, rows=len(inp.items))
        p = self.in_process[system]
        return run_in_process(
            system, cfg, construct=p.construct, items=inp.items, parse=p.parse, extra=p.extra
        )


# -------------------------------------------------------------------------------------------------------
# The run


@contextmanager
def embedded_ray(
    *, needed: bool, num_cpus: int, num_gpus: int | None, niceness: int | None
) -> Iterator[dict[str, Any]]:
    """The embedded Ray cluster for the Ray systems: the one already initialized, else one started here
    with its workers at `niceness` (None: Ray's default, 15) and shut down on exit. Yields the machine
    fields to record (empty when Ray is not `needed`)."""
    import ray

    from pipeline.execute import init_ray

    own = needed and not ray.is_initialized()
    if own:
        saved = os.environ.get("RAY_worker_niceness")
        if niceness is not None:
            os.environ["RAY_worker_niceness"] = str(niceness)  # read by the raylet at start
        try:
            init_ray(address=None, num_cpus=num_cpus, num_gpus=num_gpus)
        finally:
            if saved is None:
                os.environ.pop("RAY_worker_niceness", None)
            else:
                os.environ["RAY_worker_niceness"] = saved
    info: dict[str, Any] = {}
    if needed:
        info["ray_logical_cpus"] = ray.cluster_resources().get("CPU")
        info["ray_worker_niceness"] = niceness if own else "(cluster already running)"
    try:
        yield info
    finally:
        if own:
            ray.shutdown()


def run_benchmark(
    cfg: HarnessConfig,
    *,
    name: str,
    systems: Sequence[str],
    run: Systems,
    describe: Mapping[str, Any],
    ray_cpus: int | None = None,
    results_dir: Path | None = None,
    log: Callable[[str], Any] = print,
    reference: str = "pipeline",
    unit: str = "rows",
    per_run: Callable[[SystemRun], str] | None = None,
    agreement_key: str = "agreement_vs_reference",
) -> tuple[dict[str, Any], Path]:
    """Run every system of `cfg.systems`, in the order of `systems`, `cfg.repeats` times; write the JSON;
    return (payload, path).

    `run` runs one system once (the Ray systems' warm-up over `run.inputs.warmup_path`). The Ray systems run
    on the embedded cluster already initialized, else on one started here with `ray_cpus` logical CPUs
    (default: what the shardwise job needs, `pipeline.execute.embedded_cpus`; `embedded_ray`). `describe` adds
    the benchmark's own payload fields (model, data, ...); `per_run` adds figures to a run's `extra` and
    returns a suffix for its log line."""
    import torch

    from pipeline.bind import bind
    from pipeline.execute import embedded_cpus

    unknown = sorted(set(cfg.systems) - set(systems))
    if unknown:
        raise ValueError(f"unknown systems {unknown}; available: {list(systems)}")
    torch.set_num_threads(cfg.threads)
    uses_ray = any(s in cfg.systems for s in RAY_SYSTEMS)
    if ray_cpus is None:
        inp = run.inputs
        ray_cpus = embedded_cpus(
            bind(run.spec(cfg, input_path=inp.input_path, out_uri=inp.work_dir / "unused"))
        )
    runs: list[SystemRun] = []
    with embedded_ray(
        needed=uses_ray,
        num_cpus=ray_cpus,
        num_gpus=1 if cfg.device == "cuda" else None,
        niceness=cfg.ray_worker_niceness,
    ) as ray_info:
        machine = {**machine_info(device=cfg.device, torch_threads=cfg.threads), **ray_info}
        if cfg.warmup_rows:
            for system in RAY_SYSTEMS:
                if system in cfg.systems:
                    log(f"warm-up: {system}")
                    run.run(cfg, system, "warmup", run.inputs.warmup_path)
        for rep in range(cfg.repeats):
            for system in systems:
                if system not in cfg.systems:
                    continue
                load = os.getloadavg()[0]
                with CpuMeter() as meter:
                    one = run.run(cfg, system, str(rep), None)
                one.cpu_s, one.load_1m = meter.cpu_s, load
                suffix = per_run(one) if per_run is not None else ""
                log(
                    f"repeat {rep + 1}/{cfg.repeats} {system:<12} {one.rows_per_s:8.2f} {unit}/s  steady "
                    f"{one.steady_rows_per_s:8.2f} {unit}/s{suffix}  startup {one.startup_s:6.2f} s  "
                    f"cpu {one.cpu_s or 0:6.1f} s  load {load:.1f}"
                )
                runs.append(one)

    last = {r.name: r for r in runs}  # outputs of each system's last repeat
    reference = reference if reference in last else next(iter(last))
    ref = last[reference]
    payload: dict[str, Any] = {
        "benchmark": name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {**asdict(cfg), "dtype": cfg.resolved_dtype()},
        "machine": machine,
        **describe,
        "reference": reference,
        "systems": summarize(runs, reference=reference),
        agreement_key: {n: round(agreement(r.labels, ref.labels), 5) for n, r in last.items()},
        "agreement_pairwise": {
            f"{a}_vs_{b}": round(agreement(last[a].labels, last[b].labels), 5)
            for i, a in enumerate(last)
            for b in list(last)[i + 1 :]
        },
    }
    if ref.scores and all(len(r.scores) == len(ref.scores) for r in last.values()):
        payload["max_abs_score_diff_vs_reference"] = {
            n: float(f"{np.nanmax(np.abs(np.array(r.scores) - np.array(ref.scores))):.3g}")
            for n, r in last.items()
        }
    path = write_results(payload, name=name, out_dir=results_dir)
    payload["results_path"] = str(path)
    return payload, path


def pair_agreement(payload: Mapping[str, Any], a: str, b: str) -> float | None:
    """The pairwise agreement of systems `a` and `b` in a payload, whichever order it was recorded in."""
    pairs = payload["agreement_pairwise"]
    return pairs.get(f"{a}_vs_{b}", pairs.get(f"{b}_vs_{a}"))


def check_agreement(payload: Mapping[str, Any], *, against: str, minimum: float, items: str = "rows") -> int:
    """1 (and a FAILED line on stderr) when shardwise's outputs agree with `against`'s on fewer than
    `minimum` of the rows; 0 when they agree enough or either system did not run."""
    got = pair_agreement(payload, against, "shardwise")
    if got is not None and got < minimum:
        print(
            f"FAILED: shardwise's outputs agree with {against}'s on {got:.2%} of {items}, below {minimum:.0%}",
            file=sys.stderr,
        )
        return 1
    return 0


# -------------------------------------------------------------------------------------------------------
# Command line and report


def add_common_args(p: argparse.ArgumentParser, d: HarnessConfig, systems: Sequence[str]) -> None:
    """The options every benchmark takes, defaulting to `d`'s values."""
    p.add_argument("--rows", type=int, default=d.rows, help="inputs (default %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="rows per forward (default %(default)s)"
    )
    p.add_argument(
        "--repeats", type=int, default=d.repeats, help="timed runs per system; medians are reported"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=d.dtype,
        help="default: float32 on cpu, bfloat16 on cuda",
    )
    p.add_argument(
        "--threads", type=int, default=d.threads, help="torch threads in every system (default: cores)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shard-rows", type=int, default=d.shard_rows, help="shardwise input.shard_rows")
    p.add_argument(
        "--max-batch-tokens", type=int, default=d.max_batch_tokens, help="shardwise stage max_batch_tokens"
    )
    p.add_argument("--warmup-rows", type=int, default=d.warmup_rows)
    p.add_argument(
        "--systems", default=",".join(d.systems), help=f"comma-separated subset of {','.join(systems)}"
    )
    p.add_argument("--min-agreement", type=float, default=d.min_agreement)
    p.add_argument(
        "--ray-worker-niceness",
        type=int,
        default=d.ray_worker_niceness,
        help="niceness of the embedded Ray workers (default %(default)s; Ray's own default is 15)",
    )


def config_from_args(
    p: argparse.ArgumentParser,
    a: argparse.Namespace,
    d: C,
    systems: Sequence[str],
    *,
    positive: Sequence[str] = ("rows", "batch_size", "repeats", "threads", "shard_rows"),
) -> C:
    """`d` with every field the parsed options name; `positive` options must be >= 1."""
    for name in positive:
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    chosen = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    bad = sorted(set(chosen) - set(systems))
    if bad:
        p.error(f"unknown systems {bad}; available: {', '.join(systems)}")
    values = {f.name: getattr(a, f.name) for f in fields(d) if f.name != "systems" and hasattr(a, f.name)}
    return replace(d, **values, systems=chosen)


def print_report(
    payload: Mapping[str, Any], *, header: str, agreement_key: str = "agreement_vs_reference"
) -> None:
    """The header line (the benchmark's `header`, then batch, machine and repeats), the table, the load
    averages the runs started at, and the results path."""
    cfg, m = payload["config"], payload["machine"]
    print(
        f"\n{header} · batch {cfg['batch_size']} · {m['device']}, {m['cpu_count']} cores, torch threads "
        f"{m['torch_threads']} · medians of {cfg['repeats']} repeat(s)\n"
    )
    print(
        format_table(
            payload["systems"],
            reference=payload["reference"],
            agreement_vs_reference=payload[agreement_key],
        )
    )
    loads = [
        r["load_1m"]
        for fig in payload["systems"].values()
        for r in fig["repeats"]
        if r["load_1m"] is not None
    ]
    if loads:
        busy = max(loads) > 1.5 * (payload["machine"]["cpu_count"] or 1)
        note = (
            " (other work was running: wall-clock figures are noisy; rows/cpu-s is steadier)" if busy else ""
        )
        print(f"\n1-minute load average at the start of each run: {min(loads):.1f}–{max(loads):.1f}{note}")
    print(f"results: {payload['results_path']}")
