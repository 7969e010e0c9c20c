"""Image classification from JPEG bytes, four ways, on the same model and the same images, in one run:

    shardwise    run_inference(parse_spec({...})): Parquet of JPEG bytes → sharded Ray Data job → Parquet
                 (decode + resize in CPU tasks, uint8 to the replica, normalise + forward there)
    pipeline     transformers.pipeline("image-classification", batch_size=B) over the images (opened
                 lazily from the bytes: the pipeline decodes them)
    naive_ray    ray.data.read_parquet → map_batches(class that decodes + runs the image processor +
                 forwards, batch_size=B, one actor) → write_parquet, on the same embedded Ray
    model_only   the processor's pixel tensors prepared beforehand, batched straight into the model

    python -m bench.image_classification [--rows 2000] [--batch-size 32] [--repeats 1]
                                         [--model vit-tiny|vit-small|vit-base] [--device cpu|cuda]

Images: scikit-image's sample photos (`infra.assets.fetch_sample_photos`), each image a seeded random crop of
one photo rescaled so its longer side is 224–500 px, saved as JPEG (quality 90). Models (random init,
10 labels, saved once so every system loads the same weights; ViTImageProcessor 224×224, mean=std=0.5):
    vit-micro  patch 32, hidden 192, 4 layers, 3 heads, MLP 768      (50 tokens; the default)
    vit-tiny   patch 16, hidden 192, 6 layers, 3 heads, MLP 768      (197 tokens)
    vit-small  patch 16, hidden 384, 12 layers, 6 heads, MLP 1536    (ViT-S/16)
    vit-base   patch 16, hidden 768, 12 layers, 12 heads, MLP 3072   (ViT-B/16; for a GPU)
What shardwise can gain on a CPU is the decode/resize work it takes off the forward's critical path (and
does more cheaply: no float rescale/normalize on the CPU), so the ratio to the pipeline is bounded by the
share of preprocessing in the pipeline's time: large for vit-micro (as for any model on a GPU), small for
vit-tiny/16 on 2 cores, where the forward is ~85% of the work.

Steady-state rates and `startup_s` are defined as in bench.text_classification (bench.common). Prints the
table (ratios against `pipeline`) and writes bench/results/image_classification-<time>.json. Exits
non-zero when shardwise's labels agree with the pipeline's on fewer than 99% of images.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench import harness

__all__ = ["MODELS", "SYSTEMS", "BenchConfig", "build_images", "main", "prepare_model", "run_benchmark"]

SYSTEMS = ("model_only", "pipeline", "shardwise", "naive_ray")
REFERENCE = "pipeline"
NAME = "image_classification"
# name → (patch, hidden, layers, heads, MLP)
MODELS = {
    "vit-micro": (32, 192, 4, 3, 768),
    "vit-tiny": (16, 192, 6, 3, 768),
    "vit-small": (16, 384, 12, 6, 1536),
    "vit-base": (16, 768, 12, 12, 3072),
    "vit-nano": (32, 32, 1, 2, 64),  # for smoke tests
}


@dataclass(frozen=True)
class BenchConfig(harness.HarnessConfig):
    rows: int = 2000
    batch_size: int = 32
    model: Literal["vit-micro", "vit-tiny", "vit-small", "vit-base", "vit-nano"] = "vit-micro"
    min_side: int = 224
    max_side: int = 500
    # 500 images (~45 KB each) per shard: four shards for the default 2,000, so a steady state shows.
    shard_rows: int = 500
    warmup_rows: int = 64
    systems: tuple[str, ...] = SYSTEMS


# -------------------------------------------------------------------------------------------------------
# Model and images


def prepare_model(name: str, dest: Path, *, seed: int = 0) -> Path:
    """A random ViT of the named size with 10 labels + ViTImageProcessor (224×224), saved to `dest`."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    patch, hidden, layers, heads, mlp = MODELS[name]
    torch.manual_seed(seed)
    labels = [f"class_{i}" for i in range(10)]
    config = ViTConfig(
        image_size=224,
        patch_size=patch,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    dest.mkdir(parents=True, exist_ok=True)
    ViTForImageClassification(config).eval().save_pretrained(dest)
    ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(dest)
    return dest


def build_images(
    n: int, *, seed: int = 0, min_side: int = 224, max_side: int = 500, photos: Sequence[Any] | None = None
) -> list[bytes]:
    """n JPEG images: seeded random crops of `photos` (PIL images; default: the sample photos), longer side
    in [min_side, max_side]."""
    from PIL import Image

    if photos is None:
        photos = sample_photos()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        side = int(rng.integers(min_side, max_side + 1))
        scale = side / max(cw, ch)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def sample_photos() -> list[Any]:
    """The sample photos of `infra.assets.fetch_sample_photos`, as RGB PIL images."""
    from PIL import Image

    from infra.assets import SAMPLE_PHOTOS, fetch_sample_photos

    root = fetch_sample_photos()
    return [Image.open(root / name).convert("RGB") for name in SAMPLE_PHOTOS]


def _read_labels(uri: Path, n: int) -> tuple[list[str], list[float]]:
    labels, scores = harness.read_by_id(uri, n, {"label": "", "score": float("nan")})
    return labels, scores


def _open(images: Sequence[bytes]) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(b)) for b in images]  # header only: the pipeline decodes


# -------------------------------------------------------------------------------------------------------
# The four systems


def _pipeline(cfg: BenchConfig, inp: harness.BenchInputs) -> Any:
    from transformers import pipeline

    pipe = pipeline(
        "image-classification",
        model=str(inp.model_dir),
        batch_size=cfg.batch_size,
        device=cfg.device,
        dtype=cfg.torch_dtype(),
    )
    return lambda images: pipe(_open(images), top_k=1)


class _NaiveClassifier:
    """What a Ray Data user writes first: processor + model in __init__, decode + process + forward per batch."""

    def __init__(self, model_dir: str, *, device: str, dtype: str, threads: int) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        torch.set_num_threads(threads)
        self.torch, self.device = torch, device
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.model = (
            AutoModelForImageClassification.from_pretrained(model_dir, dtype=getattr(torch, dtype))
            .to(device)
            .eval()
        )
        self.dtype = getattr(torch, dtype)
        self.id2label = self.model.config.id2label

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch["image"]]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with self.torch.inference_mode():
            logits = self.model(pixel_values=pixels.to(self.device, self.dtype)).logits
        probs = logits.float().softmax(-1).cpu().numpy()  # (B, num_labels)
        best = probs.argmax(-1)
        n = len(best)
        return {
            "id": batch["id"],
            "label": np.array([self.id2label[int(i)] for i in best]),
            "score": probs[np.arange(n), best].astype(np.float64),
            "batch_done_at": np.full(n, time.time()),  # for the steady-state window only
        }


class _ModelOnly:
    """The processor's pixel tensors prepared beforehand on the device, batched straight into the model."""

    def __init__(self, cfg: BenchConfig, inp: harness.BenchInputs) -> None:
        self.cfg, self.inp = cfg, inp

    def load(self) -> Any:
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(
            self.inp.model_dir, dtype=self.cfg.torch_dtype()
        )
        return model.to(self.cfg.device).eval()

    def prepare(self, model: Any) -> list[Any]:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(self.inp.model_dir)
        images, step = self.inp.items, self.cfg.batch_size
        return [
            processor(images=[im.convert("RGB") for im in _open(images[k : k + step])], return_tensors="pt")[
                "pixel_values"
            ].to(self.cfg.device, self.cfg.torch_dtype())
            for k in range(0, len(images), step)
        ]

    def forward(self, model: Any, batch: Any) -> Any:
        return model(pixel_values=batch).logits

    def collect(self, model: Any, batches: list[Any], outputs: list[Any]) -> tuple[list[str], list[float]]:
        import torch

        probs = torch.cat(outputs).float().softmax(-1).cpu().numpy()
        id2label = model.config.id2label
        return [id2label[int(i)] for i in probs.argmax(-1)], probs.max(-1).astype(float).tolist()


def _systems(cfg: BenchConfig, inp: harness.BenchInputs) -> harness.Systems:
    return harness.Systems(
        inputs=inp,
        job="bench-image-classification",
        stage={
            "name": "classify",
            "task": "image-classification",
            "model": str(inp.model_dir),
            "inputs": {"image": "image"},
        },
        read=_read_labels,
        udf=_NaiveClassifier,
        in_process={
            "pipeline": harness.InProcess(
                construct=lambda: _pipeline(cfg, inp),
                parse=lambda out: ([o[0]["label"] for o in out], [float(o[0]["score"]) for o in out]),
            )
        },
        model_only=_ModelOnly(cfg, inp),
    )


# -------------------------------------------------------------------------------------------------------
# The run


def run_benchmark(
    cfg: BenchConfig,
    *,
    model_dir: Path,
    images: Sequence[bytes],
    work_dir: Path,
    results_dir: Path | None = None,
    log: Any = print,
) -> tuple[dict[str, Any], Path]:
    """Run every system in `cfg.systems` `cfg.repeats` times; write the JSON; return (payload, path)."""
    images = list(images)
    inp = harness.bench_inputs(
        model_dir, images, column="image", work_dir=work_dir, warmup_rows=cfg.warmup_rows, binary=True
    )
    sizes = [im.size for im in _open(images)]
    patch, hidden, layers, heads, mlp = MODELS[cfg.model]
    return harness.run_benchmark(
        cfg,
        name=NAME,
        systems=SYSTEMS,
        run=_systems(cfg, inp),
        describe={
            "model": {
                "name": cfg.model,
                "hidden": hidden,
                "layers": layers,
                "heads": heads,
                "mlp": mlp,
                "patch": patch,
            },
            "data": {
                "images": len(images),
                "jpeg_kb_mean": round(float(np.mean([len(b) for b in images])) / 1024, 1),
                "longer_side_px": [min(max(s) for s in sizes), max(max(s) for s in sizes)],
            },
        },
        results_dir=results_dir,
        log=log,
        reference=REFERENCE,
        unit="img",
    )


# -------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m bench.image_classification", description=__doc__.split("\n\n")[0]
    )
    harness.add_common_args(p, d, SYSTEMS)
    p.add_argument("--model", choices=list(MODELS), default=d.model)
    return harness.config_from_args(p, p.parse_args(argv), d, SYSTEMS)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    cfg = _parse_args(argv)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-img-") as tmp:
        work = Path(tmp)
        print(f"preparing {cfg.model} and {cfg.rows} JPEG images in {work}", file=sys.stderr)
        model_dir = prepare_model(cfg.model, work / "model", seed=cfg.seed)
        images = build_images(cfg.rows, seed=cfg.seed, min_side=cfg.min_side, max_side=cfg.max_side)
        payload, _ = run_benchmark(
            cfg, model_dir=model_dir, images=images, work_dir=work, log=lambda m: print(m, file=sys.stderr)
        )
    return report(payload, cfg)


def report(payload: dict[str, Any], cfg: BenchConfig) -> int:
    """Print the table; 1 when shardwise's labels agree with the pipeline's on too few images."""
    d, mo = payload["data"], payload["model"]
    harness.print_report(
        payload,
        header=f"image-classification · {mo['name']} (ViT, patch {mo['patch']}, hidden {mo['hidden']}, "
        f"{mo['layers']} layers) · {d['images']} JPEGs, longer side {d['longer_side_px'][0]}–"
        f"{d['longer_side_px'][1]} px, mean {d['jpeg_kb_mean']} KB",
    )
    return harness.check_agreement(payload, against=REFERENCE, minimum=cfg.min_agreement, items="images")


if __name__ == "__main__":
    sys.exit(main())
