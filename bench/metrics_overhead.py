"""What the job metrics (pipeline.metrics) cost: the same shardwise job with metrics on and off, alternating.

    python -m bench.metrics_overhead [--rows 2000] [--repeats 3] [--batch-size 32] [--shard-rows 250]

The job is the text-classification benchmark's (bench.text_classification): MiniLM-L6 with a seeded 2-label
head over real Rotten Tomatoes reviews cut to 5–200 words, one CPU replica, on one embedded Ray cluster
(started once; a warm-up job first, so workers exist and have imported torch). Each repeat runs the job
twice, metrics on and off (`SHARDWISE_METRICS=0` in the driver), in alternating order (on/off, off/on, ...)
so a drift in the machine's load does not favour one side.

Per run: the steady rate (rows after the first committed shard / time between the first and last commit,
bench.common.steady_rate), the wall rate, and the CPU seconds of the whole process tree (driver + embedded
Ray, bench.common.CpuMeter). Prints the medians and the ratios on/off (the cost is 1 − ratio of rates, or
the CPU ratio − 1), and the metrics summary of the last run with metrics on. On a busy machine the A/B difference is noise above 2%,
so it also measures the recording cost per block directly (`recording_cost`: the events, sends and Ray
metrics of a block, against a real sink) and divides it by a block's work (its steps' seconds). Writes
bench/results/metrics_overhead-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    CpuMeter,
    build_texts,
    committed_shards,
    machine_info,
    rt_review_pool,
    steady_rate,
    write_results,
)

NAME = "metrics_overhead"


def _spec(model_dir: Path, inp: Path, out: Path, *, batch_size: int, shard_rows: int) -> Any:
    from pipeline.spec import parse_spec

    return parse_spec(
        {
            "name": "bench-metrics-overhead",
            "input": {"uri": str(inp), "id_column": "id", "shard_rows": shard_rows},
            "stages": [
                {
                    "name": "classify",
                    "task": "text-classification",
                    "model": str(model_dir),
                    "inputs": {"text": "text"},
                    "batch_size": batch_size,
                    "replicas": 1,
                }
            ],
            "output": {"uri": str(out), "mode": "overwrite"},
        }
    )


def _run(spec: Any, *, metrics: bool) -> dict[str, Any]:
    from pipeline.execute import run_inference

    saved = os.environ.get("SHARDWISE_METRICS")
    os.environ["SHARDWISE_METRICS"] = "1" if metrics else "0"
    try:
        started = time.time()
        with CpuMeter() as meter:
            result = run_inference(spec, overwrite=True, progress=False)
        wall = time.time() - started
    finally:
        if saved is None:
            os.environ.pop("SHARDWISE_METRICS", None)
        else:
            os.environ["SHARDWISE_METRICS"] = saved
    shards = committed_shards(result.output_uri, result.run_id)
    steady = steady_rate(sorted((s["committed_at"], s["rows_in"]) for s in shards))
    return {
        "metrics": metrics,
        "rows": result.rows_run,
        "wall_s": wall,
        "rows_per_s": result.rows_run / wall,
        "steady_rows_per_s": steady,
        "cpu_s": meter.cpu_s,
        "load_1m": os.getloadavg()[0],
        "run_id": result.run_id,
        "output": result.output_uri,
    }


def recording_cost(*, shard_rows: int, batch_size: int, blocks: int = 200) -> float:
    """Seconds the metrics add to one block of a one-stage job, measured directly (on a loaded machine the
    A/B rates above are noisier than 2%): the four CPU step events, one event per micro-batch, and the
    three sends (read+preprocess task, replica, postprocess+commit task), each a round trip to a real sink
    actor plus Ray's metrics."""
    import pyarrow as pa
    import ray

    from pipeline.block import ERROR_COLUMNS, SHARD
    from pipeline.metrics import MetricsContext, Recorder, Sink

    sink = ray.remote(num_cpus=0)(Sink).remote()
    ray.get(sink.drain.remote())
    ctx = MetricsContext(sink, "bench", "bench-metrics-overhead")
    block = pa.table(
        {
            SHARD: pa.array(["00000"] * shard_rows),
            **{c: pa.nulls(shard_rows, pa.string()) for c in ERROR_COLUMNS},
        }
    )
    lengths = list(range(1, batch_size + 1))
    started = time.perf_counter()
    for _ in range(blocks):
        t = time.time()
        first, replica, last = Recorder(ctx), Recorder(ctx), Recorder(ctx)
        first.step(None, "read", t, None, block)
        first.step("classify", "preprocess", t, block, block)
        first.send()
        for _ in range(max(1, shard_rows // batch_size)):
            replica.forward(
                "classify", shard="00000", t_start=t, seconds=0.1, lengths=lengths,
                errors=[None] * batch_size, unit="tokens", pads=True,
            )  # fmt: skip
        replica.send()
        last.step("classify", "postprocess", t, block, block)
        last.step(None, "commit", t, None, block)
        last.send()
    cost = (time.perf_counter() - started) / blocks
    ray.kill(sink)
    return cost


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="pairs of runs (on + off)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-rows", type=int, default=250)
    args = p.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from bench.text_classification import prepare_model
    from pipeline.bind import bind
    from pipeline.execute import embedded_cpus, init_ray
    from pipeline.metrics import read_summary

    with tempfile.TemporaryDirectory(prefix="shardwise-metrics-bench-") as tmp:
        work = Path(tmp)
        model_dir = prepare_model("minilm", work / "model")
        texts = build_texts(rt_review_pool(), args.rows, seed=0)
        inp = work / "texts.parquet"
        pq.write_table(
            pa.table({"id": list(range(len(texts))), "text": texts}), inp, row_group_size=args.shard_rows
        )
        warm = work / "warm.parquet"
        pq.write_table(pa.table({"id": list(range(64)), "text": texts[:64]}), warm)
        spec = _spec(model_dir, inp, work / "out", batch_size=args.batch_size, shard_rows=args.shard_rows)
        init_ray(address=None, num_cpus=embedded_cpus(bind(spec)))
        runs: list[dict[str, Any]] = []
        try:
            _run(
                _spec(model_dir, warm, work / "warm-out", batch_size=args.batch_size, shard_rows=64),
                metrics=True,
            )
            for rep in range(args.repeats):
                for flag in (True, False) if rep % 2 == 0 else (False, True):
                    run = _run(spec, metrics=flag)
                    runs.append(run)
                    print(
                        f"repeat {rep + 1}/{args.repeats} metrics {'on ' if flag else 'off'}: "
                        f"{run['rows_per_s']:.1f} rows/s wall, steady {run['steady_rows_per_s'] or 0:.1f} rows/s, "
                        f"cpu {run['cpu_s'] or 0:.1f} s, load {run['load_1m']:.1f}",
                        file=sys.stderr,
                    )
            last_on = [r for r in runs if r["metrics"]][-1]
            summary = read_summary(last_on["output"], last_on["run_id"])
            per_block = recording_cost(shard_rows=args.shard_rows, batch_size=args.batch_size)
        finally:
            ray.shutdown()

    def med(key: str, *, on: bool) -> float:
        return statistics.median(r[key] for r in runs if r["metrics"] is on and r[key] is not None)

    figures = {
        key: {
            "on": med(key, on=True),
            "off": med(key, on=False),
            "ratio_on_off": med(key, on=True) / med(key, on=False),
        }
        for key in ("rows_per_s", "steady_rows_per_s", "cpu_s")
    }
    # Work per block: every step's and micro-batch's seconds over the run's shards (the same loaded machine).
    work = sum(st["seconds"] for st in summary["steps"]) / max(1, summary["shards_run"]) if summary else None
    payload = {
        "name": NAME,
        "recording_s_per_block": per_block,
        "work_s_per_block": work,
        "recording_share": per_block / work if work else None,
        "config": vars(args),
        "machine": machine_info(device="cpu", torch_threads=os.cpu_count() or 1),
        "runs": runs,
        "medians": figures,
        "summary_with_metrics": summary,
    }
    path = write_results(payload, name=NAME)
    for key, f in figures.items():
        print(f"{key:<18} on {f['on']:10.2f}  off {f['off']:10.2f}  on/off {f['ratio_on_off']:.4f}")
    if summary:
        st = summary["stages"]["classify"]
        print(
            f"metrics of the last run: {summary['events']} events; replica busy {st['busy_share']:.0%}, padding "
            f"{st['forward']['padding_efficiency']:.0%} efficient, forward p50 {st['forward']['latency_s']['p50']:.3f} s"
        )
    if work:
        print(
            f"recording cost {per_block * 1e3:.2f} ms per block of {args.shard_rows} rows; the blocks' work "
            f"{work:.2f} s each: {per_block / work:.3%}"
        )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
