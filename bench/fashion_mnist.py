"""Real-data proof for image-classification fine-tuning: a small ConvNeXT from a random start, trained with
`kind: finetune` on Debian's Fashion-MNIST, then evaluated with `kind: inference` on the test split.

    python -m bench.fashion_mnist [--train 8000] [--test 2000] [--epochs 2]

Data: `infra.assets.load_fashion_mnist` (Debian `dataset-fashion-mnist`, installed when missing). Images
go in as 28×28 grayscale PNG bytes — the `image` column a user would have — so the inference job decodes
them (mode L → RGB) like any other input. Model: ConvNeXT, 3 stages (32/64/128 channels, depths 2/2/2,
~0.6M parameters), random init; its processor resizes 28 → 32 px (crop_pct 1.0: no crop). The first
`--train` training images and the first `--test` test images are used (both roughly class-balanced).

Prints and writes (bench/results/fashion_mnist-<time>.json) the per-epoch train/eval figures from the
fine-tune job and the test accuracy of the inference job, with wall times.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import machine_info, write_results


def _png_column(images: np.ndarray) -> pa.Array:
    from PIL import Image

    out = []
    for pixels in images:
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return pa.array(out, pa.binary())


def _base_model(out_dir: Path, labels: tuple[str, ...]) -> Path:
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessorPil

    torch.manual_seed(0)
    config = ConvNextConfig(
        num_stages=3,
        hidden_sizes=[32, 64, 128],
        depths=[2, 2, 2],
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    ConvNextForImageClassification(config).save_pretrained(out_dir)
    # Fashion-MNIST is gray on black: mean/std of the data, not ImageNet's.
    ConvNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_pct=1.0, image_mean=[0.286] * 3, image_std=[0.353] * 3
    ).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    from infra.assets import FASHION_MNIST_LABELS, load_fashion_mnist
    from jobs.finetune import run_finetune
    from pipeline.commit import read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fashion-"))
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_x, train_y = train_x[: args.train], train_y[: args.train]
    test_x, test_y = test_x[: args.test], test_y[: args.test]
    names = np.array(FASHION_MNIST_LABELS)
    pq.write_table(
        pa.table({"id": np.arange(len(train_y)), "image": _png_column(train_x), "label": names[train_y]}),
        work / "train.parquet",
    )
    pq.write_table(
        pa.table({"id": np.arange(len(test_y)), "image": _png_column(test_x), "truth": names[test_y]}),
        work / "test.parquet",
    )
    base = _base_model(work / "base", FASHION_MNIST_LABELS)

    t0 = time.perf_counter()
    tuned = run_finetune(
        parse_spec(
            {
                "name": "fashion-mnist",
                "kind": "finetune",
                "input": {"uri": str(work / "train.parquet"), "id_column": "id"},
                "stages": [
                    {
                        "name": "clf",
                        "task": "image-classification",
                        "model": str(base),
                        "inputs": {"image": "image"},
                    }
                ],
                "output": {"uri": str(work / "model"), "mode": "overwrite"},
                "train": {
                    "epochs": args.epochs,
                    "lr": args.lr,
                    "batch_size": args.batch_size,
                    "eval_fraction": 0.1,
                    "warmup_ratio": 0.05,
                    "label_names": list(FASHION_MNIST_LABELS),
                    "seed": 0,
                },
            }
        ),
        progress=False,
    )
    finetune_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    job = run_inference(
        parse_spec(
            {
                "name": "fashion-mnist-test",
                "input": {
                    "uri": str(work / "test.parquet"),
                    "id_column": "id",
                    "keep_columns": ["id", "truth"],
                },
                "stages": [
                    {
                        "name": "clf",
                        "task": "image-classification",
                        "model": str(work / "model"),
                        "inputs": {"image": "image"},
                        "batch_size": 128,
                    }
                ],
                "output": {"uri": str(work / "predictions"), "mode": "overwrite"},
            }
        ),
        progress=False,
    )
    inference_s = time.perf_counter() - t0
    rows = read_output(str(work / "predictions")).to_pydict()
    accuracy = float(np.mean(np.array(rows["label"]) == np.array(rows["truth"])))

    payload = {
        "benchmark": "fashion_mnist",
        "model": "ConvNeXT 3 stages 32/64/128, depths 2/2/2, random init, 32 px",
        "train_rows": tuned.train_rows,
        "eval_rows": tuned.eval_rows,
        "epochs": tuned.metrics,
        "finetune_wall_s": round(finetune_s, 1),
        "test_rows": job.rows_in,
        "test_rows_ok": job.rows_ok,
        "test_accuracy": round(accuracy, 4),
        "inference_wall_s": round(inference_s, 1),
        "machine": machine_info(device="cpu", torch_threads=__import__("torch").get_num_threads()),
    }
    path = write_results(payload, name="fashion_mnist")
    for m in tuned.metrics:
        print(
            f"epoch {m['epoch']}: train_loss {m['train_loss']:.3f}  eval_loss {m['eval_loss']:.3f}  "
            f"eval_accuracy {m['eval_accuracy']:.3f}  ({m['epoch_s']:.0f} s)"
        )
    print(
        f"fine-tune {tuned.train_rows} images: {finetune_s:.0f} s; test accuracy {accuracy:.4f} on "
        f"{job.rows_ok}/{job.rows_in} test images ({inference_s:.0f} s) → {path}"
    )
    return payload


if __name__ == "__main__":
    main()
