"""Text classification, four ways, on the same model and the same texts, in one process and one run:

    shardwise    run_inference(parse_spec({...})): Parquet in → sharded Ray Data job → Parquet out
    pipeline     transformers.pipeline("text-classification", batch_size=B, truncation=True) over a list
    naive_ray    ray.data.read_parquet → map_batches(class that tokenizes + forwards, batch_size=B,
                 padding="longest", no sorting, one actor) → write_parquet, on the same embedded Ray
    model_only   pre-tokenized, length-sorted, pre-padded batches straight into the model (an upper bound)

    python -m bench.text_classification [--rows 4000] [--batch-size 32] [--repeats 1]
                                        [--model-size minilm|base] [--device cpu|cuda]

Texts are real Rotten Tomatoes reviews concatenated to a word count drawn uniformly from [5, 200] (seeded).
The model is MiniLM-L6 (`infra.assets.fetch_minilm`) with a seeded random 2-label head, saved once so every
system loads the very same weights; `--model-size base` is a random BERT-base (768 hidden, 12 layers) with
MiniLM's tokenizer. Every system runs with the same torch threads and dtype.

Steady-state rate (startup excluded), per system:
    shardwise    rows after the first committed shard / (last commit − first commit)   [manifest times]
    pipeline     rows / time of the call over all texts, after construction and a warm-up call
    naive_ray    rows after the first batch / (last batch done − first batch done)      [a column the
                 classifier adds; the final write is outside the window]
    model_only   rows / time of the forward loop, after load and one warm-up batch
`startup_s` is then wall − rows / steady for all four (see bench.common).

Prints a table (medians over repeats; ratios against `pipeline`) and writes
bench/results/text_classification-<timestamp>.json. Exits non-zero when shardwise's labels agree with the
pipeline's on fewer than 99% of rows.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench.common import (
    CpuMeter,
    SystemRun,
    agreement,
    build_texts,
    committed_shards,
    format_table,
    machine_info,
    rt_review_pool,
    steady_rate,
    summarize,
    text_stats,
    write_results,
)

__all__ = ["SYSTEMS", "BenchConfig", "main", "prepare_model", "run_benchmark"]

SYSTEMS = ("model_only", "pipeline", "shardwise", "naive_ray")
REFERENCE = "pipeline"
NAME = "text_classification"


@dataclass(frozen=True)
class BenchConfig:
    rows: int = 4000
    batch_size: int = 32
    repeats: int = 1
    model_size: Literal["minilm", "base"] = "minilm"
    device: Literal["cpu", "cuda"] = "cpu"
    # None: float32 on CPU (what the pipeline uses by default), bfloat16 on CUDA (what shardwise picks).
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    min_words: int = 5
    max_words: int = 200
    # shardwise: rows per shard (input.shard_rows). The replica length-sorts within a shard, so padding
    # waste shrinks as shards grow: on these texts (5–200 words, batch 32) a 250-row shard pads to 1.13× the
    # real tokens, 1,000 rows to 1.035×, 4,000 to 1.01×, unsorted batches (pipeline, naive_ray) to 1.93×.
    # 1,000 keeps that near the floor and still gives the default 4,000 rows four shards, so a steady state
    # (commits after the first) can be measured; shardwise's own default (4,096) would make one shard.
    shard_rows: int = 1000
    max_batch_tokens: int | None = None
    # Rows of the warm-up pass each system gets before it is timed (Ray jobs: a whole small job, so worker
    # processes exist and have imported torch).
    warmup_rows: int = 64
    systems: tuple[str, ...] = SYSTEMS
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


# -------------------------------------------------------------------------------------------------------
# The model and the inputs


def prepare_model(size: Literal["minilm", "base"], dest: Path, *, seed: int = 0) -> Path:
    """Save MiniLM-L6 with a seeded random 2-label head (or a random BERT-base with MiniLM's tokenizer) to
    `dest`, so every system loads identical weights from disk (a fresh `from_pretrained(num_labels=2)` per
    system would draw a different head each time)."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )
    from transformers.utils import logging as hf_logging

    from infra.assets import fetch_minilm

    minilm = fetch_minilm()
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier.*" is expected here
    try:
        if size == "minilm":
            model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
        elif size == "base":
            config = BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                max_position_embeddings=512,
                num_labels=2,
            )
            model = BertForSequenceClassification(config)
        else:
            raise ValueError(f"unknown model size {size!r}; choose minilm or base")
    finally:
        hf_logging.set_verbosity(verbosity)
    dest.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def _write_inputs(path: Path, texts: Sequence[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())}), path
    )
    return path


def _read_labels(uri: Path, n: int) -> tuple[list[str], list[float]]:
    """label/score per input row id from a Parquet output directory (ids 0..n-1)."""
    import pyarrow.dataset as pads

    table = pads.dataset(
        str(uri), format="parquet", exclude_invalid_files=True, ignore_prefixes=["_", "."]
    ).to_table(columns=["id", "label", "score"])
    labels: list[str] = [""] * n
    scores: list[float] = [float("nan")] * n
    for i, label, score in zip(
        table.column("id").to_pylist(),
        table.column("label").to_pylist(),
        table.column("score").to_pylist(),
        strict=True,
    ):
        labels[int(i)] = label
        scores[int(i)] = score
    return labels, scores


# -------------------------------------------------------------------------------------------------------
# The four systems


@dataclass(frozen=True)
class _Inputs:
    model_dir: Path
    texts: list[str]
    input_ids: list[list[int]]  # pre-tokenized (truncated to max_length), for model_only
    input_path: Path  # Parquet: id, text
    warmup_path: Path  # the first warmup_rows rows
    max_length: int
    work_dir: Path


def _shardwise_spec(cfg: BenchConfig, inp: _Inputs, *, input_path: Path, out_uri: Path) -> Any:
    from pipeline.spec import parse_spec

    stage: dict[str, Any] = {
        "name": "classify",
        "task": "text-classification",
        "model": str(inp.model_dir),
        "inputs": {"text": "text"},
        "params": {"truncation": True, "max_length": inp.max_length},
        "batch_size": cfg.batch_size,
        "max_batch_tokens": cfg.max_batch_tokens,
        "replicas": 1,
        "dtype": cfg.resolved_dtype(),
        "device": cfg.device,
        "num_gpus": 1 if cfg.device == "cuda" else 0,
    }
    if cfg.device == "cpu" and cfg.threads != _shardwise_default_threads():
        # The replica's torch threads follow its CPU reservation when one is set (pipeline.execute).
        stage["num_cpus"] = float(cfg.threads)
    return parse_spec(
        {
            "name": "bench-text-classification",
            "input": {"uri": str(input_path), "id_column": "id", "shard_rows": cfg.shard_rows},
            "stages": [stage],
            "output": {"uri": str(out_uri), "mode": "overwrite"},
        }
    )


def _shardwise_default_threads() -> int:
    # What pipeline.execute gives one CPU replica without num_cpus: the node's cores split across replicas.
    return max(1, os.cpu_count() or 1)


def run_shardwise(cfg: BenchConfig, inp: _Inputs, *, tag: str, input_path: Path | None = None) -> SystemRun:
    from pipeline.execute import run_inference

    input_path = input_path or inp.input_path
    out_uri = inp.work_dir / f"out-shardwise-{tag}"
    spec = _shardwise_spec(cfg, inp, input_path=input_path, out_uri=out_uri)
    started = time.time()
    result = run_inference(spec, overwrite=True, progress=False)
    wall = time.time() - started
    shards = committed_shards(result.output_uri, result.run_id)
    events = sorted((s["committed_at"], s["rows_in"]) for s in shards)
    rows = sum(s["rows_in"] for s in shards)
    steady = steady_rate(events)
    labels, scores = _read_labels(out_uri, rows)
    return SystemRun(
        "shardwise",
        rows,
        wall,
        steady if steady is not None else rows / wall,
        labels,
        scores,
        extra={
            "shards": len(shards),
            "shard_rows": cfg.shard_rows,
            "first_commit_s": round(events[0][0] - started, 3) if events else None,
            "last_commit_s": round(events[-1][0] - started, 3) if events else None,
            "rows_error": result.rows_error,
            "replica_threads": cfg.threads if cfg.device == "cpu" else None,
            "max_batch_tokens": cfg.max_batch_tokens,
        },
    )


def run_pipeline(cfg: BenchConfig, inp: _Inputs, *, texts: Sequence[str] | None = None) -> SystemRun:
    import torch
    from transformers import pipeline

    texts = list(texts if texts is not None else inp.texts)
    t0 = time.perf_counter()
    pipe = pipeline(
        "text-classification",
        model=str(inp.model_dir),
        tokenizer=str(inp.model_dir),
        batch_size=cfg.batch_size,
        truncation=True,
        max_length=inp.max_length,
        device=cfg.device,
        dtype=getattr(torch, cfg.resolved_dtype()),
    )
    t1 = time.perf_counter()
    if cfg.warmup_rows:
        pipe(texts[: cfg.warmup_rows])
    _sync(cfg.device)
    t2 = time.perf_counter()
    out = pipe(texts)
    _sync(cfg.device)
    t3 = time.perf_counter()
    del pipe
    gc.collect()
    return SystemRun(
        "pipeline",
        len(texts),
        t3 - t0,
        len(texts) / (t3 - t2),
        [o["label"] for o in out],
        [float(o["score"]) for o in out],
        extra={"construct_s": round(t1 - t0, 3), "warmup_s": round(t2 - t1, 3)},
    )


class _NaiveClassifier:
    """What a Ray Data user writes first: tokenizer + model in __init__, tokenize + forward per batch."""

    def __init__(self, model_dir: str, *, device: str, dtype: str, threads: int, max_length: int) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=getattr(torch, dtype))
            .to(device)
            .eval()
        )
        self.id2label = self.model.config.id2label

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        enc = self.tokenizer(
            list(batch["text"]),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            probs = self.model(**enc).logits.float().softmax(-1).cpu().numpy()  # (B, num_labels)
        best = probs.argmax(-1)
        n = len(best)
        return {
            "id": batch["id"],
            "label": np.array([self.id2label[int(i)] for i in best]),
            "score": probs[np.arange(n), best].astype(np.float64),
            # For the benchmark's steady-state window only (not something a user would add).
            "batch_done_at": np.full(n, time.time()),
        }


def run_naive_ray(cfg: BenchConfig, inp: _Inputs, *, tag: str, input_path: Path | None = None) -> SystemRun:
    import pyarrow.dataset as pads
    import ray

    input_path = input_path or inp.input_path
    out_dir = inp.work_dir / f"out-naive-{tag}"
    started = time.time()
    ds = ray.data.read_parquet(str(input_path))
    ds = ds.map_batches(
        _NaiveClassifier,
        compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_args=(str(inp.model_dir),),
        fn_constructor_kwargs={
            "device": cfg.device,
            "dtype": cfg.resolved_dtype(),
            "threads": cfg.threads,
            "max_length": inp.max_length,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=0 if cfg.device == "cuda" else 1,
        num_gpus=1 if cfg.device == "cuda" else 0,
    )
    ds.write_parquet(str(out_dir))
    wall = time.time() - started
    table = pads.dataset(str(out_dir), format="parquet").to_table(columns=["id", "batch_done_at"])
    done, counts = np.unique(table.column("batch_done_at").to_numpy(), return_counts=True)
    rows = table.num_rows
    steady = steady_rate(list(zip(done.tolist(), counts.tolist(), strict=True)))
    labels, scores = _read_labels(out_dir, rows)
    return SystemRun(
        "naive_ray",
        rows,
        wall,
        steady if steady is not None else rows / wall,
        labels,
        scores,
        extra={
            "first_batch_s": round(float(done[0]) - started, 3) if len(done) else None,
            "last_batch_s": round(float(done[-1]) - started, 3) if len(done) else None,
        },
    )


def run_model_only(cfg: BenchConfig, inp: _Inputs) -> SystemRun:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(inp.model_dir).pad_token_id or 0
    t0 = time.perf_counter()
    model = (
        AutoModelForSequenceClassification.from_pretrained(
            inp.model_dir, dtype=getattr(torch, cfg.resolved_dtype())
        )
        .to(cfg.device)
        .eval()
    )
    t1 = time.perf_counter()
    # Pre-padded, length-sorted batches, on the device before the clock starts: only forward is timed.
    order = sorted(range(len(inp.input_ids)), key=lambda i: -len(inp.input_ids[i]))
    batches = []
    for k in range(0, len(order), cfg.batch_size):
        idx = order[k : k + cfg.batch_size]
        longest = len(inp.input_ids[idx[0]])
        ids = np.full((len(idx), longest), pad_id, dtype=np.int64)  # (B, T)
        mask = np.zeros((len(idx), longest), dtype=np.int64)
        for r, i in enumerate(idx):
            ids[r, : len(inp.input_ids[i])] = inp.input_ids[i]
            mask[r, : len(inp.input_ids[i])] = 1
        batches.append((idx, torch.from_numpy(ids).to(cfg.device), torch.from_numpy(mask).to(cfg.device)))
    with torch.inference_mode():
        t2 = time.perf_counter()
        if batches:
            model(input_ids=batches[-1][1], attention_mask=batches[-1][2])  # warm-up: the shortest batch
        _sync(cfg.device)
        t3 = time.perf_counter()
        logits = [model(input_ids=ids, attention_mask=mask).logits for _, ids, mask in batches]
        _sync(cfg.device)
        t4 = time.perf_counter()
    id2label = model.config.id2label
    labels: list[str] = [""] * len(order)
    scores: list[float] = [float("nan")] * len(order)
    for (idx, _, _), lg in zip(batches, logits, strict=True):
        probs = lg.float().softmax(-1).cpu().numpy()
        for r, i in enumerate(idx):
            labels[i] = id2label[int(probs[r].argmax())]
            scores[i] = float(probs[r].max())
    del model
    gc.collect()
    n = len(order)
    return SystemRun(
        "model_only",
        n,
        (t1 - t0) + (t4 - t2),
        n / (t4 - t3),
        labels,
        scores,
        extra={"load_s": round(t1 - t0, 3), "warmup_s": round(t3 - t2, 3), "pad_s": round(t2 - t1, 3)},
    )


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------------------
# The run


def _run_system(system: str, cfg: BenchConfig, inp: _Inputs, *, tag: str) -> SystemRun:
    if system == "shardwise":
        return run_shardwise(cfg, inp, tag=tag)
    if system == "naive_ray":
        return run_naive_ray(cfg, inp, tag=tag)
    if system == "pipeline":
        return run_pipeline(cfg, inp)
    return run_model_only(cfg, inp)


def run_benchmark(
    cfg: BenchConfig,
    *,
    model_dir: Path,
    texts: Sequence[str],
    work_dir: Path,
    results_dir: Path | None = None,
    log: Any = print,
) -> tuple[dict[str, Any], Path]:
    """Run every system in `cfg.systems` `cfg.repeats` times over `texts`; write the JSON; return
    (payload, path). Uses the embedded Ray cluster already initialized, else starts one and stops it."""
    import ray
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from models.text_classification import effective_max_length
    from pipeline.bind import bind
    from pipeline.execute import embedded_cpus, init_ray

    unknown = sorted(set(cfg.systems) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown systems {unknown}; available: {list(SYSTEMS)}")
    torch.set_num_threads(cfg.threads)
    texts = list(texts)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_length = effective_max_length(tokenizer, AutoConfig.from_pretrained(model_dir), None)
    t0 = time.perf_counter()
    input_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    tokenize_s = time.perf_counter() - t0
    inp = _Inputs(
        model_dir=Path(model_dir),
        texts=texts,
        input_ids=input_ids,
        input_path=_write_inputs(work_dir / "input" / "texts.parquet", texts),
        warmup_path=_write_inputs(work_dir / "warmup" / "texts.parquet", texts[: max(1, cfg.warmup_rows)]),
        max_length=max_length,
        work_dir=work_dir,
    )
    uses_ray = any(s in cfg.systems for s in ("shardwise", "naive_ray"))
    own_ray = uses_ray and not ray.is_initialized()
    if own_ray:
        spec = _shardwise_spec(cfg, inp, input_path=inp.input_path, out_uri=work_dir / "unused")
        saved = os.environ.get("RAY_worker_niceness")
        if cfg.ray_worker_niceness is not None:
            os.environ["RAY_worker_niceness"] = str(cfg.ray_worker_niceness)  # read by the raylet at start
        try:
            init_ray(
                address=None, num_cpus=embedded_cpus(bind(spec)), num_gpus=1 if cfg.device == "cuda" else None
            )
        finally:
            if saved is None:
                os.environ.pop("RAY_worker_niceness", None)
            else:
                os.environ["RAY_worker_niceness"] = saved
    machine = machine_info(device=cfg.device, torch_threads=cfg.threads)
    if uses_ray:
        machine["ray_logical_cpus"] = ray.cluster_resources().get("CPU")
        machine["ray_worker_niceness"] = cfg.ray_worker_niceness if own_ray else "(cluster already running)"
    runs: list[SystemRun] = []
    try:
        if cfg.warmup_rows:
            if "shardwise" in cfg.systems:
                log("warm-up: shardwise")
                run_shardwise(cfg, inp, tag="warmup", input_path=inp.warmup_path)
            if "naive_ray" in cfg.systems:
                log("warm-up: naive_ray")
                run_naive_ray(cfg, inp, tag="warmup", input_path=inp.warmup_path)
        for rep in range(cfg.repeats):
            for system in SYSTEMS:
                if system not in cfg.systems:
                    continue
                load = os.getloadavg()[0]
                with CpuMeter() as meter:
                    run = _run_system(system, cfg, inp, tag=str(rep))
                run.cpu_s = meter.cpu_s
                run.load_1m = load
                log(
                    f"repeat {rep + 1}/{cfg.repeats} {system:<11} {run.rows_per_s:8.1f} rows/s  steady "
                    f"{run.steady_rows_per_s:8.1f} rows/s  startup {run.startup_s:6.2f} s  "
                    f"cpu {run.cpu_s or 0:6.1f} s  load {load:.1f}"
                )
                runs.append(run)
    finally:
        if own_ray:
            ray.shutdown()

    last = {r.name: r for r in runs}  # labels of each system's last repeat
    reference = REFERENCE if REFERENCE in last else next(iter(last))
    agree = {name: round(agreement(r.labels, last[reference].labels), 5) for name, r in last.items()}
    pairwise = {
        f"{a}_vs_{b}": round(agreement(last[a].labels, last[b].labels), 5)
        for i, a in enumerate(last)
        for b in list(last)[i + 1 :]
    }
    score_diff = {
        name: float(np.nanmax(np.abs(np.array(r.scores) - np.array(last[reference].scores))))
        for name, r in last.items()
        if len(r.scores) == len(last[reference].scores)
    }
    summary = summarize(runs, reference=reference)
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {**asdict(cfg), "dtype": cfg.resolved_dtype()},
        "machine": machine,
        "model": {
            "size": cfg.model_size,
            "dir": str(model_dir),
            "max_length": max_length,
            **_model_shape(model_dir),
        },
        "data": {**text_stats(texts, [len(x) for x in input_ids]), "tokenize_s": round(tokenize_s, 3)},
        "reference": reference,
        "systems": summary,
        "agreement_vs_reference": agree,
        "agreement_pairwise": pairwise,
        "max_abs_score_diff_vs_reference": {k: float(f"{v:.3g}") for k, v in score_diff.items()},
    }
    path = write_results(payload, name=NAME, out_dir=results_dir)
    payload["results_path"] = str(path)
    return payload, path


def _model_shape(model_dir: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return {
        k: getattr(config, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_labels")
    }


# -------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m bench.text_classification", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rows", type=int, default=d.rows, help="texts to classify (default %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="rows per forward (default %(default)s)"
    )
    p.add_argument(
        "--repeats", type=int, default=d.repeats, help="timed runs per system; medians are reported"
    )
    p.add_argument("--model-size", choices=["minilm", "base"], default=d.model_size)
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: float32 on cpu, bfloat16 on cuda",
    )
    p.add_argument(
        "--threads", type=int, default=d.threads, help="torch threads in every system (default: cores)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shard-rows", type=int, default=d.shard_rows, help="shardwise input.shard_rows")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="shardwise stage max_batch_tokens")
    p.add_argument("--warmup-rows", type=int, default=d.warmup_rows)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of %(default)s")
    p.add_argument("--min-agreement", type=float, default=d.min_agreement)
    p.add_argument(
        "--ray-worker-niceness",
        type=int,
        default=d.ray_worker_niceness,
        help="niceness of the embedded Ray workers (default %(default)s; Ray's own default is 15)",
    )
    a = p.parse_args(argv)
    for name in ("rows", "batch_size", "repeats", "threads", "shard_rows"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    bad = sorted(set(systems) - set(SYSTEMS))
    if bad:
        p.error(f"unknown systems {bad}; available: {', '.join(SYSTEMS)}")
    return replace(
        d,
        rows=a.rows,
        batch_size=a.batch_size,
        repeats=a.repeats,
        model_size=a.model_size,
        device=a.device,
        dtype=a.dtype,
        threads=a.threads,
        seed=a.seed,
        shard_rows=a.shard_rows,
        max_batch_tokens=a.max_batch_tokens,
        warmup_rows=a.warmup_rows,
        systems=systems,
        min_agreement=a.min_agreement,
        ray_worker_niceness=a.ray_worker_niceness,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    cfg = _parse_args(argv)
    hf_logging.disable_progress_bar()  # "Loading weights" bars from every system would bury the log
    texts = build_texts(
        rt_review_pool(), cfg.rows, seed=cfg.seed, min_words=cfg.min_words, max_words=cfg.max_words
    )
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
        work = Path(tmp)
        print(f"preparing model ({cfg.model_size}) and {len(texts)} texts in {work}", file=sys.stderr)
        model_dir = prepare_model(cfg.model_size, work / "model", seed=cfg.seed)
        payload, path = run_benchmark(
            cfg, model_dir=model_dir, texts=texts, work_dir=work, log=lambda m: print(m, file=sys.stderr)
        )
    m, d = payload["machine"], payload["data"]
    print(
        f"\ntext-classification · {payload['model']['size']} ({payload['model']['num_hidden_layers']} layers, "
        f"hidden {payload['model']['hidden_size']}) · {d['rows']} texts, {d['words']['min']}–{d['words']['max']} "
        f"words (mean {d['words']['mean']}), mean {d['tokens']['mean']} tokens · batch {cfg.batch_size} · "
        f"{m['device']}, {m['cpu_count']} cores, torch threads {m['torch_threads']} · "
        f"medians of {cfg.repeats} repeat(s)\n"
    )
    print(
        format_table(
            payload["systems"],
            reference=payload["reference"],
            agreement_vs_reference=payload["agreement_vs_reference"],
        )
    )
    loads = [
        r["load_1m"]
        for fig in payload["systems"].values()
        for r in fig["repeats"]
        if r["load_1m"] is not None
    ]
    if loads:
        busy = max(loads) > 1.5 * (m["cpu_count"] or 1)
        print(
            f"\n1-minute load average at the start of each run: {min(loads):.1f}–{max(loads):.1f}"
            + (
                " (other work was running: wall-clock figures are noisy; rows/cpu-s is steadier)"
                if busy
                else ""
            )
        )
    print(f"results: {path}")
    got = payload["agreement_vs_reference"].get("shardwise")
    if got is not None and payload["reference"] == REFERENCE and got < cfg.min_agreement:
        print(
            f"FAILED: shardwise agrees with the pipeline on {got:.2%} of rows, below {cfg.min_agreement:.0%}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
