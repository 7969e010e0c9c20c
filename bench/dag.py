"""A 2-stage DAG against the same two stages run as two single-stage jobs back to back, on real text.

    python -m bench.dag                         # 4,000 reviews, MiniLM heads, 1 repeat
    python -m bench.dag --repeats 3 --rows 8000

The data are Rotten Tomatoes reviews (`bench.common.rt_review_pool`, cut to 5-200 words by
`bench.common.build_texts`) in one Parquet file whose row groups hold `--shard-rows` rows each. The two
stages read the same `text` column (a fan-out), the shape of "tag entities and classify sentiment":

    entities   token-classification (aggregation "simple"): MiniLM-L6 with a seeded random 9-tag BIO head
    sentiment  text-classification: MiniLM-L6 with a seeded random 2-label head

The heads are random (the predictions are meaningless), the work per row is MiniLM's real work. Two systems:

    dag           one job with both stages: the rows are read once, each stage has its own replica pool,
                  both pools work on different shards at the same time, one commit per shard
    back_to_back  job `entities` alone, then job `sentiment` alone: each reads the input and commits its
                  own output (what a user without DAGs runs)

Both use the same shard_rows, batch_size and one replica per stage (shardwise's defaults otherwise: on CPU
the cores are split between the job's replicas, so the DAG's two replicas get one torch thread each and a
single-stage job's replica gets both). All runs share one embedded Ray cluster, sized for the DAG, started
before the first run; each system first runs a small warm-up job so worker processes exist and have
imported torch. Repeats alternate which system goes first. Reported per system: median wall time, rows/s
(input rows / wall: every row gets both stages in either system) and CPU seconds of the whole process tree;
the ratios DAG / back-to-back; and how often the DAG's per-stage predictions equal the single-stage jobs'
(labels for sentiment; the (entity_group, start, end) spans for entities).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import CpuMeter, build_texts, machine_info, rt_review_pool, write_results
from bench.harness import embedded_ray

__all__ = ["SYSTEMS", "DagBenchConfig", "main", "prepare_models", "run_benchmark"]

SYSTEMS = ("dag", "back_to_back")
STAGES = ("entities", "sentiment")
# CoNLL-2003's tag set: the head a real English NER fine-tune of MiniLM would have.
NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
SENTIMENT_LABELS = ("neg", "pos")


@dataclass(frozen=True)
class DagBenchConfig:
    rows: int = 4000
    # 8 shards of the default 4,000 rows: enough for the DAG's two pools to overlap on different shards and
    # for the replicas' length sort to keep padding low (see bench.text_classification's shard_rows note).
    shard_rows: int = 500
    batch_size: int = 32
    repeats: int = 1
    warmup_rows: int = 64
    seed: int = 0
    min_words: int = 5
    max_words: int = 200
    # Niceness of the embedded Ray cluster's workers when the benchmark starts it (Ray's default, 15, makes
    # them yield to anything else on a shared machine; see bench.text_classification).
    ray_worker_niceness: int | None = 0


# -------------------------------------------------------------------------------------------------------
# Models and inputs


def prepare_models(dest: Path, *, seed: int = 0, stages: Sequence[str] = STAGES) -> dict[str, Path]:
    """MiniLM-L6 (the asset cache's, fetched if missing) with seeded random heads, saved once under `dest`:
    `dest/ner` (token classification, NER_LABELS) and `dest/sentiment` (2 labels). shardwise refuses a base
    folder without the task's head (models.loading.load_pretrained), so the heads are saved with it."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    from infra.assets import fetch_minilm

    base = fetch_minilm()
    tokenizer = AutoTokenizer.from_pretrained(base)
    out: dict[str, Path] = {}
    for stage, cls, labels in (
        ("entities", AutoModelForTokenClassification, NER_LABELS),
        ("sentiment", AutoModelForSequenceClassification, SENTIMENT_LABELS),
    ):
        if stage not in stages:
            continue
        folder = dest / stage
        if not (folder / "model.safetensors").is_file():
            torch.manual_seed(seed)
            model = cls.from_pretrained(
                base,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
            )
            model.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
        out[stage] = folder
    return out


def write_input(path: Path, texts: Sequence[str], *, row_group_size: int) -> Path:
    """`id` (int64, 0..n-1) and `text`, one row group per shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _stage(name: str, model: Path, cfg: DagBenchConfig) -> dict[str, Any]:
    params = {"aggregation_strategy": "simple"} if name == "entities" else {}
    return {
        "name": name,
        "task": "token-classification" if name == "entities" else "text-classification",
        "model": str(model),
        "inputs": {"text": "text"},
        "params": params,
        "batch_size": cfg.batch_size,
        "replicas": 1,
    }


def job_spec(
    cfg: DagBenchConfig, *, stages: Sequence[str], models: dict[str, Path], input_path: Path, out: Path
) -> dict[str, Any]:
    """The job dict: both stages (the DAG) or one (a back-to-back job)."""
    return {
        "name": "dag-bench-" + "-".join(stages),
        "input": {"uri": str(input_path), "id_column": "id", "shard_rows": cfg.shard_rows},
        "stages": [_stage(s, models[s], cfg) for s in stages],
        "output": {"uri": str(out), "mode": "overwrite"},
    }


# -------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    system: str
    repeat: int
    rows: int  # input rows every stage saw
    wall_s: float
    cpu_s: float | None
    load_1m: float
    jobs: list[dict[str, Any]]  # per job: stages, wall_s, rows_run, rows_ok, rows_error
    outputs: dict[str, str]  # stage → output folder holding its predictions

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    def figures(self) -> dict[str, Any]:
        return {
            "repeat": self.repeat,
            "rows": self.rows,
            "wall_s": round(self.wall_s, 3),
            "rows_per_s": round(self.rows_per_s, 2),
            "cpu_s": round(self.cpu_s, 2) if self.cpu_s is not None else None,
            "load_1m": round(self.load_1m, 2),
            "jobs": self.jobs,
        }


def _run_job(spec: dict[str, Any]) -> dict[str, Any]:
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    t0 = time.perf_counter()
    result = run_inference(parse_spec(spec), progress=False)
    wall = time.perf_counter() - t0
    return {
        "stages": [s["name"] for s in spec["stages"]],
        "wall_s": round(wall, 3),
        "job_wall_s": round(result.wall_s, 3),
        "rows_run": result.rows_run,
        "rows_ok": result.rows_ok,
        "rows_error": result.rows_error,
        "shards_run": result.shards_run,
        "stage_counts": result.manifest.get("stages"),
    }


def run_system(
    system: str,
    cfg: DagBenchConfig,
    *,
    models: dict[str, Path],
    input_path: Path,
    out_root: Path,
    repeat: int,
) -> Run:
    """One timed run of `system` over every row of `input_path`; outputs under `out_root/<system>-<repeat>`."""
    base = out_root / f"{system}-{repeat}"
    if system == "dag":
        plan = [(STAGES, base)]
        outputs = {s: str(base) for s in STAGES}
    elif system == "back_to_back":
        plan = [((s,), base / s) for s in STAGES]
        outputs = {s: str(base / s) for s in STAGES}
    else:
        raise ValueError(f"unknown system {system!r}; available: {list(SYSTEMS)}")
    load = os.getloadavg()[0]
    jobs = []
    with CpuMeter() as meter:
        t0 = time.perf_counter()
        for stages, out in plan:
            jobs.append(_run_job(job_spec(cfg, stages=stages, models=models, input_path=input_path, out=out)))
        wall = time.perf_counter() - t0
    rows = min(j["rows_run"] for j in jobs)
    return Run(system, repeat, rows, wall, meter.cpu_s, load, jobs, outputs)


def read_predictions(run: Run) -> dict[str, dict[int, Any]]:
    """stage → {id: prediction}: the label (sentiment) or the entity spans (entities)."""
    from pipeline.commit import read_output

    preds: dict[str, dict[int, Any]] = {}
    for stage in STAGES:
        table = read_output(run.outputs[stage], flat=True)
        prefix = f"{stage}." if run.system == "dag" else ""
        field = "entities" if stage == "entities" else "label"
        values = table.column(prefix + field).to_pylist()
        if stage == "entities":
            values = [tuple((e["entity_group"], e["start"], e["end"]) for e in v) for v in values]
        preds[stage] = dict(zip(table.column("id").to_pylist(), values, strict=True))
    return preds


def compare(a: dict[str, dict[int, Any]], b: dict[str, dict[int, Any]], *, rows: int) -> dict[str, float]:
    """Per stage: the share of the `rows` input rows whose predictions are present in both and equal."""
    return {
        stage: round(
            sum(1 for i in range(rows) if i in a[stage] and a[stage].get(i) == b[stage].get(i)) / rows, 5
        )
        for stage in STAGES
    }


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        rs = [r for r in runs if r.system == system]
        if not rs:
            continue
        wall = _median([r.wall_s for r in rs])
        cpu = _median([r.cpu_s for r in rs])
        rows = rs[0].rows
        out[system] = {
            "rows": rows,
            "wall_s": round(wall, 3),
            "rows_per_s": round(_median([r.rows_per_s for r in rs]), 2),
            "cpu_s": round(cpu, 2) if cpu is not None else None,
            "rows_per_cpu_s": round(rows / cpu, 2) if cpu else None,
            "repeats": [r.figures() for r in rs],
        }
    return out


def ratios(systems: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """DAG / back-to-back, from the medians: rows/s above 1 and wall below 1 mean the DAG is faster."""
    dag, b2b = systems.get("dag"), systems.get("back_to_back")
    if not dag or not b2b:
        return {}

    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return {
        "rows_per_s_dag_over_b2b": div(dag["rows_per_s"], b2b["rows_per_s"]),
        "wall_s_dag_over_b2b": div(dag["wall_s"], b2b["wall_s"]),
        "cpu_s_dag_over_b2b": div(dag["cpu_s"], b2b["cpu_s"]),
    }


def run_benchmark(
    cfg: DagBenchConfig,
    *,
    model_dirs: dict[str, Path],
    texts: Sequence[str],
    work_dir: Path,
    results_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Path]:
    """Run both systems `cfg.repeats` times (alternating which goes first) over `texts`; write the JSON;
    return (payload, path). `model_dirs`: {"entities": token classifier, "sentiment": text classifier}.
    Uses the embedded Ray cluster already initialized (a test's), else starts one sized for the DAG."""
    from pipeline.bind import bind
    from pipeline.execute import embedded_cpus
    from pipeline.spec import parse_spec

    missing = sorted(set(STAGES) - set(model_dirs))
    if missing:
        raise ValueError(f"model_dirs lacks {missing}; it needs a folder for each of {list(STAGES)}")
    models = {s: Path(model_dirs[s]) for s in STAGES}
    texts = list(texts)
    input_path = write_input(work_dir / "input" / "reviews.parquet", texts, row_group_size=cfg.shard_rows)
    warm = write_input(
        work_dir / "warmup" / "reviews.parquet",
        texts[: max(1, cfg.warmup_rows)],
        row_group_size=cfg.shard_rows,
    )
    dag = bind(parse_spec(job_spec(cfg, stages=STAGES, models=models, input_path=input_path, out=work_dir)))
    runs: list[Run] = []
    with embedded_ray(
        needed=True, num_cpus=embedded_cpus(dag), num_gpus=None, niceness=cfg.ray_worker_niceness
    ) as ray_info:
        machine = machine_info(device="cpu", torch_threads=os.cpu_count() or 1)
        machine["torch_threads"] = "per replica: the node's cores split across the job's replicas"
        machine.update(ray_info)
        if cfg.warmup_rows:
            for system in SYSTEMS:
                log(f"warm-up: {system} ({cfg.warmup_rows} rows)")
                run_system(
                    system, cfg, models=models, input_path=warm, out_root=work_dir / "warmup", repeat=0
                )
        for rep in range(cfg.repeats):
            order = SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]
            for system in order:
                run = run_system(
                    system, cfg, models=models, input_path=input_path, out_root=work_dir / "out", repeat=rep
                )
                log(
                    f"repeat {rep + 1}/{cfg.repeats} {system:<13} {run.rows_per_s:7.1f} rows/s  wall "
                    f"{run.wall_s:7.2f} s  cpu {run.cpu_s or 0:7.1f} s  load {run.load_1m:.1f}  jobs "
                    + ", ".join(f"{'+'.join(j['stages'])} {j['wall_s']:.1f} s" for j in run.jobs)
                )
                runs.append(run)
        last = {r.system: r for r in runs}  # each system's last repeat
        preds = {name: read_predictions(r) for name, r in last.items()}

    systems = summarize(runs)
    agreement = compare(preds["dag"], preds["back_to_back"], rows=len(texts))
    every_row = {
        name: all(len(p) == len(texts) for p in preds[name].values()) and last[name].rows == len(texts)
        for name in last
    }
    n_words = [len(t.split()) for t in texts]
    payload = {
        "benchmark": "dag",
        "config": asdict(cfg),
        "machine": machine,
        "models": {s: str(p) for s, p in models.items()},
        "stages": {s: _stage(s, models[s], cfg) for s in STAGES},
        "data": {
            "rows": len(texts),
            "shards": -(-len(texts) // cfg.shard_rows),
            "words": {
                "min": min(n_words),
                "mean": round(statistics.fmean(n_words), 1),
                "max": max(n_words),
            },
        },
        "systems": systems,
        "ratios": ratios(systems),
        "agreement_dag_vs_back_to_back": agreement,
        "every_row_processed": every_row,
        "dag_stage_counts": last["dag"].jobs[0]["stage_counts"],
    }
    path = write_results(payload, name="dag", out_dir=results_dir)
    return payload, path


def format_table(payload: dict[str, Any]) -> str:
    head = f"{'system':<14}{'rows/s':>9}{'wall s':>9}{'cpu s':>9}{'rows/cpu-s':>12}   jobs (wall s)"
    lines = [head, "-" * len(head)]
    for name, fig in payload["systems"].items():
        last = fig["repeats"][-1]["jobs"]
        jobs = ", ".join(f"{'+'.join(j['stages'])} {j['wall_s']:.1f}" for j in last)
        cpu = f"{fig['cpu_s']:.1f}" if fig["cpu_s"] is not None else "-"
        per_cpu = f"{fig['rows_per_cpu_s']:.1f}" if fig["rows_per_cpu_s"] is not None else "-"
        lines.append(
            f"{name:<14}{fig['rows_per_s']:>9.1f}{fig['wall_s']:>9.1f}{cpu:>9}{per_cpu:>12}   {jobs}"
        )
    r = payload["ratios"]
    lines.append("")
    lines.append(
        f"DAG / back-to-back: rows/s x{r['rows_per_s_dag_over_b2b']}, wall x{r['wall_s_dag_over_b2b']}, "
        f"cpu x{r['cpu_s_dag_over_b2b']}"
    )
    agree = payload["agreement_dag_vs_back_to_back"]
    lines.append(
        "DAG predictions equal to the single-stage jobs': "
        + ", ".join(f"{s} {v:.2%}" for s, v in agree.items())
    )
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> tuple[DagBenchConfig, argparse.Namespace]:
    d = DagBenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m bench.dag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=d.rows)
    p.add_argument("--shard-rows", type=int, default=d.shard_rows)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--warmup-rows", type=int, default=d.warmup_rows, help="0: no warm-up jobs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--work-dir", type=Path, help="where models, input and outputs go (default: a temp dir)")
    p.add_argument(
        "--ner-model", type=Path, help="a token-classification folder (default: MiniLM + random head)"
    )
    p.add_argument(
        "--sentiment-model", type=Path, help="a text-classification folder (default: MiniLM + random head)"
    )
    p.add_argument("--results-dir", type=Path, help="default: bench/results")
    args = p.parse_args(argv)
    for name in ("rows", "shard_rows", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    cfg = DagBenchConfig(
        rows=args.rows,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup_rows=args.warmup_rows,
        seed=args.seed,
    )
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    cfg, args = _parse_args(argv)
    hf_logging.disable_progress_bar()
    texts = build_texts(
        rt_review_pool(), cfg.rows, seed=cfg.seed, min_words=cfg.min_words, max_words=cfg.max_words
    )
    with tempfile.TemporaryDirectory(prefix="shardwise-dag-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        err = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        err(f"preparing models and {len(texts)} reviews in {work}")
        given = {"entities": args.ner_model, "sentiment": args.sentiment_model}
        models = {s: p for s, p in given.items() if p is not None}
        models |= prepare_models(
            work / "models", seed=cfg.seed, stages=[s for s in STAGES if s not in models]
        )
        payload, path = run_benchmark(
            cfg, model_dirs=models, texts=texts, work_dir=work, results_dir=args.results_dir, log=err
        )
    m, d = payload["machine"], payload["data"]
    print(
        f"\n2-stage DAG (entities + sentiment, both on the review text) vs the two as single-stage jobs · "
        f"{d['rows']} reviews, {d['words']['min']}-{d['words']['max']} words (mean {d['words']['mean']}) · "
        f"{d['shards']} shards of {cfg.shard_rows} · batch {cfg.batch_size} · 1 replica per stage · "
        f"{m['cpu_count']} cores · medians of {cfg.repeats} repeat(s)\n"
    )
    print(format_table(payload))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
