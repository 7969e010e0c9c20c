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
import gc
import io
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench.common import (
    CpuMeter,
    SystemRun,
    agreement,
    committed_shards,
    format_table,
    machine_info,
    steady_rate,
    summarize,
    write_results,
)

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
}


@dataclass(frozen=True)
class BenchConfig:
    rows: int = 2000
    batch_size: int = 32
    repeats: int = 1
    model: Literal["vit-micro", "vit-tiny", "vit-small", "vit-base"] = "vit-micro"
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # None: fp32 on CPU, bf16 on CUDA
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    min_side: int = 224
    max_side: int = 500
    # 500 images (~45 KB each) per shard: four shards for the default 2,000, so a steady state shows.
    shard_rows: int = 500
    # shardwise read/preprocess tasks in flight; None: the engine's default.
    warmup_rows: int = 64
    systems: tuple[str, ...] = SYSTEMS
    min_agreement: float = 0.99
    # Niceness of the embedded Ray workers (Ray's default 15 would make them yield to the in-process
    # systems' competitors on a shared machine; see bench.text_classification).
    ray_worker_niceness: int | None = 0

    def resolved_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.device == "cuda" else "float32")


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


def build_images(n: int, *, seed: int = 0, min_side: int = 224, max_side: int = 500) -> list[bytes]:
    """n JPEG images: seeded random crops of the sample photos, longer side in [min_side, max_side]."""
    from PIL import Image

    from infra.assets import SAMPLE_PHOTOS, fetch_sample_photos

    root = fetch_sample_photos()
    photos = [Image.open(root / name).convert("RGB") for name in SAMPLE_PHOTOS]
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


@dataclass(frozen=True)
class _Inputs:
    model_dir: Path
    images: list[bytes]
    input_path: Path
    warmup_path: Path
    work_dir: Path


def _write_inputs(path: Path, images: Sequence[bytes]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"id": pa.array(range(len(images)), pa.int64()), "image": pa.array(images, pa.binary())}),
        path,
    )
    return path


def _read_labels(uri: Path, n: int) -> tuple[list[str], list[float]]:
    import pyarrow.dataset as pads

    table = pads.dataset(str(uri), format="parquet", exclude_invalid_files=True, ignore_prefixes=["_", "."])
    table = table.to_table(columns=["id", "label", "score"])
    labels, scores = [""] * n, [float("nan")] * n
    for i, label, score in zip(*(table.column(c).to_pylist() for c in ("id", "label", "score")), strict=True):
        labels[int(i)], scores[int(i)] = label, score
    return labels, scores


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------------------
# The four systems


def run_shardwise(cfg: BenchConfig, inp: _Inputs, *, tag: str, input_path: Path | None = None) -> SystemRun:
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    out_uri = inp.work_dir / f"out-shardwise-{tag}"
    stage: dict[str, Any] = {
        "name": "classify",
        "task": "image-classification",
        "model": str(inp.model_dir),
        "inputs": {"image": "image"},
        "batch_size": cfg.batch_size,
        "replicas": 1,
        "dtype": cfg.resolved_dtype(),
        "device": cfg.device,
        "num_gpus": 1 if cfg.device == "cuda" else 0,
    }
    if cfg.device == "cpu" and cfg.threads != (os.cpu_count() or 1):
        stage["num_cpus"] = float(cfg.threads)
    spec = parse_spec(
        {
            "name": "bench-image-classification",
            "input": {
                "uri": str(input_path or inp.input_path),
                "id_column": "id",
                "shard_rows": cfg.shard_rows,
            },
            "stages": [stage],
            "output": {"uri": str(out_uri), "mode": "overwrite"},
        }
    )
    started = time.time()
    result = run_inference(spec, overwrite=True, progress=False)
    wall = time.time() - started
    shards = committed_shards(result.output_uri, result.run_id)
    events = sorted((s["committed_at"], s["rows_in"]) for s in shards)
    rows = sum(s["rows_in"] for s in shards)
    steady = steady_rate(events)
    labels, scores = _read_labels(out_uri, rows)
    return SystemRun(
        "shardwise",
        rows,
        wall,
        steady if steady is not None else rows / wall,
        labels,
        scores,
        extra={"shards": len(shards), "shard_rows": cfg.shard_rows, "rows_error": result.rows_error},
    )


def run_pipeline(cfg: BenchConfig, inp: _Inputs) -> SystemRun:
    import torch
    from PIL import Image
    from transformers import pipeline

    t0 = time.perf_counter()
    pipe = pipeline(
        "image-classification",
        model=str(inp.model_dir),
        batch_size=cfg.batch_size,
        device=cfg.device,
        dtype=getattr(torch, cfg.resolved_dtype()),
    )
    t1 = time.perf_counter()
    if cfg.warmup_rows:
        pipe([Image.open(io.BytesIO(b)) for b in inp.images[: cfg.warmup_rows]], top_k=1)
    _sync(cfg.device)
    t2 = time.perf_counter()
    out = pipe([Image.open(io.BytesIO(b)) for b in inp.images], top_k=1)  # open = header only; decode inside
    _sync(cfg.device)
    t3 = time.perf_counter()
    del pipe
    gc.collect()
    n = len(inp.images)
    return SystemRun(
        "pipeline",
        n,
        t3 - t0,
        n / (t3 - t2),
        [o[0]["label"] for o in out],
        [float(o[0]["score"]) for o in out],
        extra={"construct_s": round(t1 - t0, 3), "warmup_s": round(t2 - t1, 3)},
    )


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


def run_naive_ray(cfg: BenchConfig, inp: _Inputs, *, tag: str, input_path: Path | None = None) -> SystemRun:
    import pyarrow.dataset as pads
    import ray

    out_dir = inp.work_dir / f"out-naive-{tag}"
    started = time.time()
    ds = ray.data.read_parquet(str(input_path or inp.input_path))
    ds = ds.map_batches(
        _NaiveClassifier,
        compute=ray.data.ActorPoolStrategy(size=1),
        fn_constructor_args=(str(inp.model_dir),),
        fn_constructor_kwargs={"device": cfg.device, "dtype": cfg.resolved_dtype(), "threads": cfg.threads},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=0 if cfg.device == "cuda" else 1,
        num_gpus=1 if cfg.device == "cuda" else 0,
    )
    ds.write_parquet(str(out_dir))
    wall = time.time() - started
    table = pads.dataset(str(out_dir), format="parquet").to_table(columns=["id", "batch_done_at"])
    done, counts = np.unique(table.column("batch_done_at").to_numpy(), return_counts=True)
    rows = table.num_rows
    steady = steady_rate(list(zip(done.tolist(), counts.tolist(), strict=True)))
    labels, scores = _read_labels(out_dir, rows)
    return SystemRun("naive_ray", rows, wall, steady if steady is not None else rows / wall, labels, scores)


def run_model_only(cfg: BenchConfig, inp: _Inputs) -> SystemRun:
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    dtype = getattr(torch, cfg.resolved_dtype())
    t0 = time.perf_counter()
    model = AutoModelForImageClassification.from_pretrained(inp.model_dir, dtype=dtype).to(cfg.device).eval()
    t1 = time.perf_counter()
    processor = AutoImageProcessor.from_pretrained(inp.model_dir)
    batches = []
    for k in range(0, len(inp.images), cfg.batch_size):
        chunk = [Image.open(io.BytesIO(b)).convert("RGB") for b in inp.images[k : k + cfg.batch_size]]
        batches.append(processor(images=chunk, return_tensors="pt")["pixel_values"].to(cfg.device, dtype))
    with torch.inference_mode():
        t2 = time.perf_counter()
        model(pixel_values=batches[-1])  # warm-up
        _sync(cfg.device)
        t3 = time.perf_counter()
        logits = [model(pixel_values=x).logits for x in batches]
        _sync(cfg.device)
        t4 = time.perf_counter()
    probs = torch.cat(logits).float().softmax(-1).cpu().numpy()
    id2label = model.config.id2label
    n = len(inp.images)
    return SystemRun(
        "model_only",
        n,
        (t1 - t0) + (t4 - t2),
        n / (t4 - t3),
        [id2label[int(i)] for i in probs.argmax(-1)],
        probs.max(-1).astype(float).tolist(),
        extra={"load_s": round(t1 - t0, 3), "preprocess_s (untimed)": round(t2 - t1, 3)},
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
    import ray
    import torch
    from PIL import Image

    from pipeline.execute import init_ray

    torch.set_num_threads(cfg.threads)
    images = list(images)
    inp = _Inputs(
        model_dir=Path(model_dir),
        images=images,
        input_path=_write_inputs(work_dir / "input" / "images.parquet", images),
        warmup_path=_write_inputs(work_dir / "warmup" / "images.parquet", images[: max(1, cfg.warmup_rows)]),
        work_dir=work_dir,
    )
    uses_ray = any(s in cfg.systems for s in ("shardwise", "naive_ray"))
    own_ray = uses_ray and not ray.is_initialized()
    if own_ray:
        saved = os.environ.get("RAY_worker_niceness")
        if cfg.ray_worker_niceness is not None:
            os.environ["RAY_worker_niceness"] = str(cfg.ray_worker_niceness)
        try:
            # One replica + one read task + one commit task always fit (as pipeline.execute sizes it).
            cpus = max(os.cpu_count() or 1, 3)
            init_ray(address=None, num_cpus=cpus, num_gpus=1 if cfg.device == "cuda" else None)
        finally:
            if saved is None:
                os.environ.pop("RAY_worker_niceness", None)
            else:
                os.environ["RAY_worker_niceness"] = saved
    machine = machine_info(device=cfg.device, torch_threads=cfg.threads)
    runs: list[SystemRun] = []
    try:
        if cfg.warmup_rows:
            if "shardwise" in cfg.systems:
                log("warm-up: shardwise")
                run_shardwise(cfg, inp, tag="warmup", input_path=inp.warmup_path)
            if "naive_ray" in cfg.systems:
                log("warm-up: naive_ray")
                run_naive_ray(cfg, inp, tag="warmup", input_path=inp.warmup_path)
        for rep in range(cfg.repeats):
            for system in SYSTEMS:
                if system not in cfg.systems:
                    continue
                load = os.getloadavg()[0]
                with CpuMeter() as meter:
                    if system == "shardwise":
                        run = run_shardwise(cfg, inp, tag=str(rep))
                    elif system == "naive_ray":
                        run = run_naive_ray(cfg, inp, tag=str(rep))
                    elif system == "pipeline":
                        run = run_pipeline(cfg, inp)
                    else:
                        run = run_model_only(cfg, inp)
                run.cpu_s, run.load_1m = meter.cpu_s, load
                log(
                    f"repeat {rep + 1}/{cfg.repeats} {system:<11} {run.rows_per_s:8.1f} img/s  steady "
                    f"{run.steady_rows_per_s:8.1f} img/s  startup {run.startup_s:6.2f} s  "
                    f"cpu {run.cpu_s or 0:6.1f} s  load {load:.1f}"
                )
                runs.append(run)
    finally:
        if own_ray:
            ray.shutdown()

    last = {r.name: r for r in runs}
    reference = REFERENCE if REFERENCE in last else next(iter(last))
    agree = {name: round(agreement(r.labels, last[reference].labels), 5) for name, r in last.items()}
    score_diff = {
        name: float(f"{np.nanmax(np.abs(np.array(r.scores) - np.array(last[reference].scores))):.3g}")
        for name, r in last.items()
    }
    sizes = [Image.open(io.BytesIO(b)).size for b in images]
    patch, hidden, layers, heads, mlp = MODELS[cfg.model]
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {**asdict(cfg), "dtype": cfg.resolved_dtype()},
        "machine": machine,
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
        "reference": reference,
        "systems": summarize(runs, reference=reference),
        "agreement_vs_reference": agree,
        "max_abs_score_diff_vs_reference": score_diff,
    }
    path = write_results(payload, name=NAME, out_dir=results_dir)
    payload["results_path"] = str(path)
    return payload, path


# -------------------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m bench.image_classification", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rows", type=int, default=d.rows)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--model", choices=list(MODELS), default=d.model)
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shard-rows", type=int, default=d.shard_rows)
    p.add_argument("--warmup-rows", type=int, default=d.warmup_rows)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--min-agreement", type=float, default=d.min_agreement)
    p.add_argument("--ray-worker-niceness", type=int, default=d.ray_worker_niceness)
    a = p.parse_args(argv)
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    bad = sorted(set(systems) - set(SYSTEMS))
    if bad:
        p.error(f"unknown systems {bad}; available: {', '.join(SYSTEMS)}")
    return replace(
        d,
        rows=a.rows,
        batch_size=a.batch_size,
        repeats=a.repeats,
        model=a.model,
        device=a.device,
        dtype=a.dtype,
        threads=a.threads,
        seed=a.seed,
        shard_rows=a.shard_rows,
        warmup_rows=a.warmup_rows,
        systems=systems,
        min_agreement=a.min_agreement,
        ray_worker_niceness=a.ray_worker_niceness,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    cfg = _parse_args(argv)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-img-") as tmp:
        work = Path(tmp)
        print(f"preparing {cfg.model} and {cfg.rows} JPEG images in {work}", file=sys.stderr)
        model_dir = prepare_model(cfg.model, work / "model", seed=cfg.seed)
        images = build_images(cfg.rows, seed=cfg.seed, min_side=cfg.min_side, max_side=cfg.max_side)
        payload, path = run_benchmark(
            cfg, model_dir=model_dir, images=images, work_dir=work, log=lambda m: print(m, file=sys.stderr)
        )
    m, d, mo = payload["machine"], payload["data"], payload["model"]
    print(
        f"\nimage-classification · {mo['name']} (ViT, patch {mo['patch']}, hidden {mo['hidden']}, {mo['layers']} layers) · "
        f"{d['images']} JPEGs, longer side {d['longer_side_px'][0]}–{d['longer_side_px'][1]} px, mean "
        f"{d['jpeg_kb_mean']} KB · batch {cfg.batch_size} · {m['device']}, {m['cpu_count']} cores, torch threads "
        f"{m['torch_threads']} · medians of {cfg.repeats} repeat(s)\n"
    )
    print(
        format_table(
            payload["systems"],
            reference=payload["reference"],
            agreement_vs_reference=payload["agreement_vs_reference"],
        )
    )
    print(f"results: {path}")
    got = payload["agreement_vs_reference"].get("shardwise")
    if got is not None and payload["reference"] == REFERENCE and got < cfg.min_agreement:
        print(f"FAILED: shardwise agrees with the pipeline on {got:.2%} of images", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
