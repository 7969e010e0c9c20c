"""Real-data fine-tune at (small) cluster shape: MiniLM on every Rotten Tomatoes training review, 2 Ray Train
workers, mid-epoch checkpoints, and one worker SIGKILLed during epoch 1.

    python -m bench.finetune_reviews [--n-test 2000] [--epochs 3] [--workers 2] [--checkpoint-every 25]
                                     [--no-kill] [--work-dir DIR]

1. Data: `infra.assets.write_rt_splits` over the whole cleaned corpus (12,752 reviews): `--n-test` held-out
   test reviews, every other review for training (10% of them held out by the job for per-epoch eval).
2. Fine-tune: a `kind: finetune` job through `jobs.finetune.run_finetune` (MiniLM-L6 from
   `infra.assets.fetch_minilm`), `num_workers` DDP workers, a checkpoint every `--checkpoint-every` steps,
   `max_failures: 2`. Unless `--no-kill`: once Ray Train has registered a checkpoint in epoch 1, one of the
   Train workers is SIGKILLed; the run restarts every worker from that checkpoint (its data position) and
   finishes. The epoch records say where it resumed (`resumed_at_step`) and how many steps the kill cost
   (`steps_redone`: the furthest step reached before the kill, less the checkpoint's step).
3. Inference: the published model (the best epoch by eval macro-F1) annotates the test reviews through
   `pipeline.execute.run_inference`; accuracy and macro-F1 come from `models.metrics`.

Prints the figures and writes bench/results/finetune_reviews-<timestamp>.json. Not a test: real assets,
~900 optimizer steps of MiniLM on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"


def _registered(root: Path) -> int:
    """Checkpoints Ray Train's controller has registered (a written one it has not registered yet would be
    lost with the worker: the restart would begin from the previous one)."""
    for snapshot in root.glob("*/checkpoint_manager_snapshot.json") if root.exists() else []:
        try:
            return len(json.loads(snapshot.read_text()).get("checkpoint_results") or [])
        except ValueError:  # being written
            return 0
    return 0


def _train_workers() -> list[int]:
    """PIDs of this process's own Ray Train workers (Ray titles an actor's process after its class)."""
    import psutil

    me = psutil.Process()
    return sorted(
        p.pid
        for p in me.children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline() if p.is_running() else [])
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.finetune_reviews", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split across the workers)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--no-kill", action="store_true", help="an uninterrupted run, to compare with")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)

    from infra.assets import fetch_minilm, fetch_rotten_tomatoes, load_rt_reviews, write_rt_splits
    from jobs.finetune import run_finetune
    from models.metrics import classification_metrics
    from pipeline.commit import read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="shardwise-ft-reviews-"))
    corpus = len(load_rt_reviews(fetch_rotten_tomatoes()))
    n_train = corpus - args.n_test
    train, test = write_rt_splits(work / "data", n_train=n_train, n_test=args.n_test)
    minilm = fetch_minilm()
    ckpt = work / "ckpt"
    spec = parse_spec(
        {
            "name": "rt-finetune-full",
            "kind": "finetune",
            "input": {"uri": str(train), "id_column": "id"},
            "stages": [
                {
                    "name": "sentiment",
                    "task": "text-classification",
                    "model": str(minilm),
                    "inputs": {"text": "text"},
                }
            ],
            "output": {"uri": str(work / "model")},
            "train": {
                "label_column": "label",
                "label_names": ["neg", "pos"],
                "eval_fraction": 0.1,
                "epochs": args.epochs,
                "lr": args.lr,
                "weight_decay": 0.01,
                "warmup_ratio": 0.1,
                "batch_size": args.batch_size,
                "max_length": 128,
                "seed": 0,
                "num_workers": args.workers,
                "checkpoint_every_steps": args.checkpoint_every,
                "max_failures": 2,
                "checkpoint_uri": str(ckpt),
            },
        }
    )
    print(f"fine-tuning MiniLM on {n_train} reviews ({args.workers} workers, {args.epochs} epochs) → {work}")
    # The fine-tune runs in the main thread (Ray's driver, its signal handlers and its shutdown belong
    # there); a watcher thread waits for the first registered checkpoint and kills one Train worker.
    killed: dict[str, Any] = {}
    done = threading.Event()

    def kill_one() -> None:
        while not done.is_set() and _registered(ckpt) < 1:
            time.sleep(0.5)
        workers = [] if done.is_set() else _train_workers()
        if workers:
            victim = workers[-1]
            os.kill(victim, signal.SIGKILL)
            killed.update(pid=victim, at_s=round(time.time() - started, 1), workers=len(workers))
            print(
                f"SIGKILLed Train worker {victim} at {killed['at_s']} s (after the first registered checkpoint)"
            )

    started = time.time()
    watcher = threading.Thread(target=kill_one, daemon=True)
    if not args.no_kill:
        watcher.start()
    try:
        ft = run_finetune(spec, overwrite=True)
    finally:
        done.set()

    inf_spec = parse_spec(
        {
            "name": "rt-sentiment-full",
            "kind": "inference",
            "input": {"uri": str(test), "id_column": "id"},
            "stages": [
                {
                    "name": "sentiment",
                    "task": "text-classification",
                    "model": str(work / "model"),
                    "inputs": {"text": "text"},
                }
            ],
            "output": {"uri": str(work / "predictions")},
        }
    )
    inf = run_inference(inf_spec, overwrite=True)
    import pyarrow.parquet as pq

    truth = dict(
        zip(
            *(pq.read_table(test, columns=["id", "label"]).column(c).to_pylist() for c in ("id", "label")),
            strict=True,
        )
    )
    predictions = read_output(str(work / "predictions"))
    ids = predictions.column("id").to_pylist()
    scored = classification_metrics(
        [{"label": lab} for lab in predictions.column("label").to_pylist()], [truth[i] for i in ids]
    )
    resumed = [r for r in ft.metrics if "resumed_at_step" in r]
    figures = {
        "train_rows": ft.train_rows,
        "eval_rows": ft.eval_rows,
        "test_rows": len(ids),
        "workers": args.workers,
        "epochs": args.epochs,
        "checkpoint_every_steps": args.checkpoint_every,
        "killed": killed or None,
        "resumed_at_step": resumed[0]["resumed_at_step"] if resumed else None,
        "steps_redone": resumed[0].get("steps_redone") if resumed else None,
        "steps": ft.metrics[-1]["steps"],
        "epochs_record": ft.metrics,
        "finetune_wall_s": round(ft.wall_s, 1),
        "inference_wall_s": round(inf.wall_s, 1),
        "test_accuracy": scored["accuracy"],
        "test_macro_f1": scored["macro_f1"],
        "load_average": os.getloadavg(),
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "epochs_record"}, indent=2, default=str))
    for r in ft.metrics:
        print(
            f"  epoch {r['epoch']}: steps {r['steps']}, train loss {r['train_loss']:.4f}, "
            f"eval acc {r.get('eval_accuracy')}, eval macro-F1 {r.get('eval_macro_f1')}, {r['epoch_s']:.0f} s"
            + (
                f", resumed at step {r['resumed_at_step']} ({r.get('steps_redone')} steps redone)"
                if "resumed_at_step" in r
                else ""
            )
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"finetune_reviews-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(figures, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
