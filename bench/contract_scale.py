"""Driver cost at scale: a job with many shards against a small one of the same shape, on a tiny model.

    python -m bench.contract_scale                       # 1,000,000 rows / 2,000 shards vs 50,000 / 100
    python -m bench.contract_scale --rows 200000         # a smaller run

Each job runs in its own driver process (a fresh embedded Ray), so the driver's peak RSS is its own. The
figures: rows/s of each job, the driver's peak memory, the manifest's size, the number and size of the
commit-record files after the run, and the wall time of a rerun of the finished job (a no-op resume:
planning, reading every commit record, verifying it against its part). The goal is a flat per-shard driver
cost: the big job's rows/s near the small one's, and a manifest that does not grow with the shards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import machine_info, write_results

ROOT = Path(__file__).resolve().parents[1]

_DRIVER = r"""
import json, sys, time
def peak_rss_mib():
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
from pipeline.execute import run_inference
from pipeline.spec import parse_spec
spec = parse_spec(json.loads(sys.argv[1]))
t0 = time.perf_counter()
result = run_inference(spec, progress=False)
wall = time.perf_counter() - t0
print(json.dumps({
    "wall_s": wall, "rows": result.rows_in, "rows_run": result.rows_run, "shards_run": result.shards_run,
    "shards_total": result.shards_total, "peak_rss_mib": peak_rss_mib(),
}))
"""


def _job(data: Path, out: Path, model: Path, shard_rows: int) -> dict[str, Any]:
    return {
        "name": "scale",
        "input": {"uri": str(data), "id_column": "id", "shard_rows": shard_rows},
        "stages": [
            {
                "name": "s",
                "task": "text-classification",
                "model": str(model),
                "inputs": {"text": "text"},
                "batch_size": 256,
                "replicas": 1,
            }
        ],
        "output": {"uri": str(out)},
    }


def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"driver failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _output_files(out: Path) -> dict[str, Any]:
    shards = list((out / "_shards").iterdir())
    return {
        "manifest_bytes": (out / "_manifest.json").stat().st_size,
        "record_files": len(shards),
        "record_bytes": sum(p.stat().st_size for p in shards),
    }


def run_one(work: Path, model: Path, *, rows: int, shard_rows: int, name: str) -> dict[str, Any]:
    from tests.helpers import make_texts

    texts = make_texts(min(rows, 20_000), seed=3, max_words=40)
    data = work / f"{name}.parquet"
    table = pa.table(
        {"id": pa.array(range(rows), pa.int64()), "text": [texts[i % len(texts)] for i in range(rows)]}
    )
    pq.write_table(table, data, row_group_size=shard_rows)
    out = work / f"out-{name}"
    spec = _job(data, out, model, shard_rows)
    first = _drive(spec)
    files = _output_files(out)
    rerun = _drive(spec)
    return {
        "rows": rows,
        "shards": first["shards_total"],
        "wall_s": round(first["wall_s"], 2),
        "rows_per_s": round(rows / first["wall_s"], 1),
        "driver_peak_rss_mib": round(first["peak_rss_mib"], 1),
        **files,
        "noop_resume_s": round(rerun["wall_s"], 2),
        "noop_resume_peak_rss_mib": round(rerun["peak_rss_mib"], 1),
        "noop_resume_shards_run": rerun["shards_run"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--small-rows", type=int, default=50_000)
    p.add_argument("--shard-rows", type=int, default=500)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.helpers import make_text_classifier

    with tempfile.TemporaryDirectory(prefix="sw-scale-") as tmp:
        work = Path(tmp)
        model = make_text_classifier(work / "model", num_labels=3)
        small = run_one(work, model, rows=args.small_rows, shard_rows=args.shard_rows, name="small")
        big = run_one(work, model, rows=args.rows, shard_rows=args.shard_rows, name="big")
    payload = {
        "machine": machine_info(device="cpu", torch_threads=0),
        "small": small,
        "big": big,
        "rows_per_s_ratio_big_vs_small": round(big["rows_per_s"] / small["rows_per_s"], 3),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = write_results(payload, name="contract_scale")
    print(f"{'':28}{'small':>14}{'big':>14}")
    for key in small:
        print(f"{key:28}{small[key]!s:>14}{big[key]!s:>14}")
    print(f"rows/s big vs small: {payload['rows_per_s_ratio_big_vs_small']}× → {path}")


if __name__ == "__main__":
    main()
