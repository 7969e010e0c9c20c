"""Real-weights proof for image-classification: EfficientNet-Lite0 (ImageNet-1k, through transformers'
TimmWrapper) labels scikit-image's sample photos in a `kind: inference` job, the same as
`transformers.pipeline("image-classification")` on the same folder.

    python -m bench.efficientnet_photos

Needs timm, and timm imports torchvision, whose PyPI x86_64 build is a CUDA build that does not load
beside the project's torch 2.13.0+cpu. Run it from a venv where torch and torchvision match, e.g.

    python -m venv /tmp/timmvenv && /tmp/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/timmvenv/lib/python3.11/site-packages/zz.pth
    /tmp/timmvenv/bin/python -m bench.efficientnet_photos

(the .pth file appends the project's packages after that venv's own torch). The TimmWrapper image
processor only returns float tensors, so this model runs on the float transfer path (`models.images`).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> dict[str, Any]:
    from PIL import Image
    from transformers import pipeline

    from bench.common import write_results
    from infra.assets import SAMPLE_PHOTOS, fetch_efficientnet_lite0, fetch_sample_photos
    from pipeline.commit import read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    model = fetch_efficientnet_lite0()
    photos = fetch_sample_photos()
    names = list(SAMPLE_PHOTOS)
    data = [(photos / n).read_bytes() for n in names]
    work = Path(tempfile.mkdtemp(prefix="effnet-"))
    pq.write_table(pa.table({"id": names, "image": pa.array(data, pa.binary())}), work / "photos.parquet")
    spec = parse_spec(
        {
            "name": "effnet-photos",
            "input": {"uri": str(work / "photos.parquet"), "id_column": "id"},
            "stages": [
                {
                    "name": "clf",
                    "task": "image-classification",
                    "model": str(model),
                    "inputs": {"image": "image"},
                    "params": {"top_k": 3},
                    "batch_size": 8,
                }
            ],
            "output": {"uri": str(work / "out")},
        }
    )
    job = run_inference(spec, progress=False)
    rows = {r["id"]: r for r in read_output(str(work / "out")).to_pylist()}
    pipe = pipeline("image-classification", model=str(model), device="cpu")
    expected = pipe([Image.open(io.BytesIO(b)) for b in data], top_k=3)
    report = []
    worst = 0.0
    for name, exp in zip(names, expected, strict=True):
        got = rows[name]["scores"]
        same = [g["label"] for g in got] == [e["label"] for e in exp]
        worst = max([worst] + [abs(g["score"] - e["score"]) for g, e in zip(got, exp, strict=True)])
        report.append({"photo": name, "shows": SAMPLE_PHOTOS[name], "top3": got, "same_as_pipeline": same})
        top = ", ".join(f"{g['label']} {g['score']:.3f}" for g in got)
        print(f"{name:24s} ({SAMPLE_PHOTOS[name]}): {top}   pipeline labels equal: {same}")
    print(f"rows ok {job.rows_ok}/{job.rows_in}; max score difference vs pipeline {worst:.2e}")
    payload = {"benchmark": "efficientnet_photos", "rows": report, "max_score_diff": worst}
    write_results(payload, name="efficientnet_photos")
    return payload


if __name__ == "__main__":
    main()
