"""A real-model DAG on real reviews: SmolLM2 summarizes each Rotten Tomatoes review in one line, the demo's
fine-tuned MiniLM classifies both the review and the summary; how often do the two labels agree?

    python -m bench.dag_reviews                        # 200 test reviews; fine-tunes MiniLM if needed
    python -m bench.dag_reviews --model out/rt-minilm --rows 100

One job, three stages, one streaming graph (README "Multi-stage jobs (DAGs)"):

    summary            text-generation, SmolLM2-135M-Instruct (infra.assets.fetch_smollm2), greedy, one line:
                       the review goes into PROMPT_TEMPLATE as one chat user message after SYSTEM_PROMPT
    review_sentiment   text-classification of the review text (fan-out)
    summary_sentiment  text-classification of summary.generated_text (chain)

The classifier is the demo's (jobs/demo.py): MiniLM-L6 fine-tuned for one epoch on the 4,000-review train
split of `infra.assets.write_rt_splits` with jobs/examples/rt-finetune.yaml. It is reused when `--model`
names a folder or `<work dir>/rt-minilm` already holds one; otherwise it is fine-tuned there first (a few
minutes on 2 cores). The reviews are the first `--rows` of the test split (which no fine-tune saw), with
their gold label kept as `gold_label`.

Reported: the share of rows whose review and summary labels agree; each label's accuracy against the gold
label; the job's rows/s and wall time; the manifest's per-stage counts; summary lengths and how the
generations ended; example rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import machine_info, write_results

__all__ = [
    "DagReviewsConfig",
    "PROMPT_TEMPLATE",
    "SYSTEM_PROMPT",
    "main",
    "run_dag_reviews",
    "summarize_rows",
]

EXAMPLES = Path(__file__).resolve().parents[1] / "jobs" / "examples"
SYSTEM_PROMPT = (
    "You summarize movie reviews. Reply with one short sentence that keeps the reviewer's opinion of the "
    "film (positive or negative). Do not add anything else."
)
PROMPT_TEMPLATE = "Summarize this movie review in one sentence:\n\n{text}"


@dataclass(frozen=True)
class DagReviewsConfig:
    rows: int = 200
    # Rows per shard: small, so the three pools work on different shards at the same time (generation is
    # the slow stage: ~25 rows keep the classifiers fed without making the last shard's tail long).
    shard_rows: int = 25
    gen_batch_size: int = 8
    cls_batch_size: int = 32
    max_new_tokens: int = 32
    system_prompt: str | None = SYSTEM_PROMPT
    prompt_template: str = PROMPT_TEMPLATE
    # The demo's fine-tune, when one is needed.
    n_train: int = 4000
    epochs: int = 1
    examples: int = 5


def job_spec(cfg: DagReviewsConfig, *, input_path: Path, smollm2: Path, classifier: Path, out: Path) -> dict:
    gen_params: dict[str, Any] = {
        "prompt_template": cfg.prompt_template,
        "chat": True,
        "max_new_tokens": cfg.max_new_tokens,
        "do_sample": False,
        "return_full_text": False,
        "stop_strings": ["\n"],
    }
    if cfg.system_prompt:
        gen_params["system_prompt"] = cfg.system_prompt
    return {
        "name": "rt-reviews-dag",
        "input": {
            "uri": str(input_path),
            "id_column": "id",
            "keep_columns": {"label": "gold_label"},
            "shard_rows": cfg.shard_rows,
        },
        "stages": [
            {
                "name": "summary",
                "task": "text-generation",
                "model": str(smollm2),
                "inputs": {"text": "text"},
                "params": gen_params,
                "batch_size": cfg.gen_batch_size,
            },
            {
                "name": "review_sentiment",
                "task": "text-classification",
                "model": str(classifier),
                "inputs": {"text": "text"},
                "batch_size": cfg.cls_batch_size,
            },
            {
                "name": "summary_sentiment",
                "task": "text-classification",
                "model": str(classifier),
                "inputs": {"text": "summary.generated_text"},
                "batch_size": cfg.cls_batch_size,
            },
        ],
        "output": {"uri": str(out), "mode": "overwrite"},
        "max_error_rate": 0.05,
    }


def finetune_classifier(
    cfg: DagReviewsConfig, *, train: Path, minilm: Path, out: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """The demo's fine-tune (jobs/examples/rt-finetune.yaml) into `out`; returns its figures."""
    from jobs.finetune import run_finetune
    from pipeline.spec import load_spec

    log(f"fine-tuning MiniLM on {cfg.n_train} reviews, {cfg.epochs} epoch(s) → {out}")
    spec = load_spec(
        EXAMPLES / "rt-finetune.yaml",
        [f"input.uri={train}", f"stages.0.model={minilm}", f"output.uri={out}", f"train.epochs={cfg.epochs}"],
    )
    t0 = time.perf_counter()
    # Resume, not overwrite: this runs only when `out` holds no finished model, and a rerun after a killed
    # fine-tune then continues from its last checkpoint instead of starting over.
    result = run_finetune(spec, overwrite=False)
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "train_rows": result.train_rows,
        "eval_rows": result.eval_rows,
        "epochs": result.metrics,
    }


def _label_names(classifier: Path) -> dict[int, str]:
    import json

    config = json.loads((classifier / "config.json").read_text())
    return {int(k): v for k, v in (config.get("id2label") or {}).items()}


def summarize_rows(rows: Sequence[dict[str, Any]], *, id2label: dict[int, str]) -> dict[str, Any]:
    """Agreement and accuracies over flat output rows (`gold_label`, `<stage>.<field>` keys)."""

    def gold(row: dict[str, Any]) -> Any:
        g = row["gold_label"]
        return id2label.get(g, g) if isinstance(g, int) else g

    n = len(rows)
    if n == 0:
        return {"rows": 0}
    review = [r["review_sentiment.label"] for r in rows]
    summary = [r["summary_sentiment.label"] for r in rows]
    golds = [gold(r) for r in rows]
    words = [len((r["summary.generated_text"] or "").split()) for r in rows]
    return {
        "rows": n,
        "agreement_review_vs_summary": round(
            sum(a == b for a, b in zip(review, summary, strict=True)) / n, 4
        ),
        "accuracy_review": round(sum(a == g for a, g in zip(review, golds, strict=True)) / n, 4),
        "accuracy_summary": round(sum(a == g for a, g in zip(summary, golds, strict=True)) / n, 4),
        "labels_review": dict(Counter(review)),
        "labels_summary": dict(Counter(summary)),
        "labels_gold": dict(Counter(golds)),
        "summary_words": {"min": min(words), "mean": round(statistics.fmean(words), 1), "max": max(words)},
        "summaries_empty": sum(1 for w in words if w == 0),
        "finish_reasons": dict(Counter(r["summary.finish_reason"] for r in rows)),
    }


def run_dag_reviews(
    cfg: DagReviewsConfig,
    *,
    work_dir: Path,
    model: Path | None = None,
    results_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Path]:
    """Fetch the assets, fine-tune the classifier if needed, run the DAG, score it; write the JSON."""
    import pyarrow.parquet as pq
    import ray

    from infra.assets import fetch_minilm, fetch_smollm2, write_rt_splits
    from pipeline.bind import bind
    from pipeline.commit import read_output
    from pipeline.execute import embedded_cpus, init_ray, run_inference
    from pipeline.spec import parse_spec

    work_dir = Path(work_dir).resolve()
    log("fetching MiniLM, SmolLM2 and the Rotten Tomatoes splits (cached after the first run)")
    minilm, smollm2 = fetch_minilm(), fetch_smollm2()
    # The demo's splits (n_test 1000; the test split does not depend on n_train), written under the work dir
    # so another n_train never rewrites the shared asset cache's copy that other benchmarks read.
    train, test = write_rt_splits(work_dir / "data" / "rt", n_train=cfg.n_train, n_test=1000)
    test_table = pq.read_table(test)
    if cfg.rows > test_table.num_rows:
        raise ValueError(f"--rows {cfg.rows}: the test split has {test_table.num_rows} reviews")
    input_path = work_dir / "input" / "reviews.parquet"
    input_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(test_table.slice(0, cfg.rows), input_path, row_group_size=cfg.shard_rows)

    out = work_dir / "reviews-dag"
    classifier = Path(model).resolve() if model else work_dir / "rt-minilm"
    spec = parse_spec(job_spec(cfg, input_path=input_path, smollm2=smollm2, classifier=classifier, out=out))
    own_ray = not ray.is_initialized()
    if own_ray:
        # Sized for the DAG (3 pools + read + commit); the fine-tune, if any, fits in it too. Started here
        # because run_finetune would otherwise start a cluster sized for itself, too small for the DAG.
        init_ray(address=None, num_cpus=embedded_cpus(bind(spec)))
    finetune = None
    try:
        if not (classifier / "config.json").is_file():
            if model:
                raise FileNotFoundError(f"--model {model}: no config.json there")
            finetune = finetune_classifier(cfg, train=train, minilm=minilm, out=classifier, log=log)
        else:
            log(f"reusing the fine-tuned classifier in {classifier}")
        log(f"running the DAG over {cfg.rows} test reviews → {out}")
        t0 = time.perf_counter()
        result = run_inference(spec, progress=False)
        wall = time.perf_counter() - t0
    finally:
        if own_ray:
            ray.shutdown()

    flat = read_output(str(out), flat=True)
    texts = dict(zip(test_table.column("id").to_pylist(), test_table.column("text").to_pylist(), strict=True))
    rows = sorted(flat.to_pylist(), key=lambda r: r["id"])
    scores = summarize_rows(rows, id2label=_label_names(classifier))
    examples = [
        {
            "id": r["id"],
            "review": texts[r["id"]],
            "summary": r["summary.generated_text"],
            "gold": r["gold_label"],
            "review_label": r["review_sentiment.label"],
            "summary_label": r["summary_sentiment.label"],
        }
        for r in rows[: cfg.examples]
    ]
    payload = {
        "benchmark": "dag_reviews",
        "config": asdict(cfg),
        "machine": machine_info(device="cpu", torch_threads=1),
        "models": {"summary": str(smollm2), "classifier": str(classifier)},
        "finetune": finetune,
        "job": {
            "rows_in": result.rows_in,
            "rows_ok": result.rows_ok,
            "rows_error": result.rows_error,
            "wall_s": round(wall, 2),
            "rows_per_s": round(result.rows_run / wall, 3) if wall > 0 else None,
            "shards": result.shards_total,
            "stage_counts": result.manifest.get("stages"),
        },
        "scores": scores,
        "examples": examples,
    }
    payload["machine"]["torch_threads"] = "per replica: the node's cores split across the job's replicas"
    return payload, write_results(payload, name="dag_reviews", out_dir=results_dir)


def format_report(payload: dict[str, Any], *, width: int = 70) -> str:
    job, s = payload["job"], payload["scores"]
    lines = [
        f"{'rows in / ok / error':<34}{job['rows_in']} / {job['rows_ok']} / {job['rows_error']}",
        f"{'wall s':<34}{job['wall_s']}",
        f"{'rows/s (3 stages per row)':<34}{job['rows_per_s']}",
        f"{'review vs summary label agree':<34}{s['agreement_review_vs_summary']:.1%}",
        f"{'accuracy: review label':<34}{s['accuracy_review']:.1%}",
        f"{'accuracy: summary label':<34}{s['accuracy_summary']:.1%}",
        f"{'summary words min/mean/max':<34}{s['summary_words']['min']}/{s['summary_words']['mean']}/"
        f"{s['summary_words']['max']} ({s['summaries_empty']} empty)",
        f"{'generation ended by':<34}{s['finish_reasons']}",
        "",
        f"{'stage':<20}{'rows in':>9}{'ok':>9}{'error':>9}",
    ]
    for name, c in (job["stage_counts"] or {}).items():
        lines.append(f"{name:<20}{c['rows_in']:>9}{c['rows_ok']:>9}{c['rows_error']:>9}")
    lines.append("")
    for ex in payload["examples"]:
        review = ex["review"] if len(ex["review"]) <= width else ex["review"][: width - 3] + "..."
        lines.append(
            f"[{ex['id']}] gold {ex['gold']} · review → {ex['review_label']} · summary → {ex['summary_label']}"
        )
        lines.append(f"    review : {review}")
        lines.append(f"    summary: {ex['summary']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    d = DagReviewsConfig()
    p = argparse.ArgumentParser(
        prog="python -m bench.dag_reviews",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=d.rows, help="test reviews to run (at most 1000)")
    p.add_argument(
        "--model", type=Path, help="a fine-tuned text-classification folder (default: fine-tune one)"
    )
    p.add_argument("--work-dir", type=Path, default=Path("out/dag_reviews"), help="default: out/dag_reviews")
    p.add_argument("--results-dir", type=Path, help="default: bench/results")
    p.add_argument("--shard-rows", type=int, default=d.shard_rows)
    p.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--no-system-prompt", action="store_true", help="only the user message (the template)")
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--epochs", type=int, default=d.epochs)
    args = p.parse_args(argv)
    cfg = DagReviewsConfig(
        rows=args.rows,
        shard_rows=args.shard_rows,
        gen_batch_size=args.gen_batch_size,
        max_new_tokens=args.max_new_tokens,
        system_prompt=None if args.no_system_prompt else d.system_prompt,
        n_train=args.n_train,
        epochs=args.epochs,
    )
    hf_logging.disable_progress_bar()
    payload, path = run_dag_reviews(
        cfg,
        work_dir=args.work_dir,
        model=args.model,
        results_dir=args.results_dir,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(
        f"\nreviews DAG · SmolLM2-135M summary → fine-tuned MiniLM on review and summary · "
        f"{payload['job']['rows_in']} Rotten Tomatoes test reviews · {payload['machine']['cpu_count']} cores\n"
    )
    print(format_report(payload))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
