"""Builders for the segmentation and depth tests: tiny random SegFormer, Mask2Former, GLPN and DPT models
(with their image processors) saved as HF folders, and synthetic images with known masks and depths.

Nothing is downloaded: configs are built here with `use_pretrained_backbone=False`-style defaults (the
Mask2Former Swin backbone is a config, not a checkpoint), weights are random and seeded.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

SEG_LABELS = ("background", "square", "disc", "bar")


def _id2label(names: tuple[str, ...]) -> dict[int, str]:
    return dict(enumerate(names))


def make_segformer(out_dir: Path, *, seed: int = 0, size: int = 64) -> Path:
    """A 2-stage SegFormer (hidden 8/16) for semantic segmentation over SEG_LABELS, images resized to size²."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(seed)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=len(SEG_LABELS),
        id2label=_id2label(SEG_LABELS),
        label2id={n: i for i, n in enumerate(SEG_LABELS)},
    )
    SegformerForSemanticSegmentation(config).eval().save_pretrained(out_dir)
    SegformerImageProcessor(size={"height": size, "width": size}).save_pretrained(out_dir)
    return out_dir


def make_mask2former(
    out_dir: Path, *, seed: int = 0, shortest_edge: int = 64, longest_edge: int = 96
) -> Path:
    """A Mask2Former with a 4-stage Swin backbone (embed 16, depth 1 per stage), 8 queries, 1 encoder and 2
    decoder layers (class head sharpened, see below). Its image processor keeps the aspect ratio: shortest
    edge 64, longest 96, multiples of 32 (32 px would leave the Swin's last stage 1x1, where GroupNorm fails)."""
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(seed)
    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        num_queries=8,
        train_num_points=256,
        num_labels=len(SEG_LABELS),
        id2label=_id2label(SEG_LABELS),
        label2id={n: i for i, n in enumerate(SEG_LABELS)},
    )
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        # A random head spreads each query over all classes and "no object" (scores ~ 1/5) and its masks
        # are near-identical blurs: nothing would pass the pipeline's thresholds. Sharpen the class head,
        # make "no object" rare and spread the mask embeddings so every subtask finds segments (at
        # threshold 0.5: 1-3 panoptic and 2-5 instance segments per image).
        model.class_predictor.weight.mul_(20.0)
        model.class_predictor.bias[-1] = -4.0
        for p in model.model.transformer_module.decoder.mask_predictor.mask_embedder.parameters():
            p.mul_(3.0)
    model.save_pretrained(out_dir)
    Mask2FormerImageProcessor(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge}, ignore_index=255
    ).save_pretrained(out_dir)
    return out_dir


def make_glpn(out_dir: Path, *, seed: int = 0) -> Path:
    """A 4-stage GLPN (hidden 8..32, one block each, decoder 16, max_depth 10)."""
    import torch
    from transformers import GLPNConfig, GLPNForDepthEstimation, GLPNImageProcessor

    torch.manual_seed(seed)
    config = GLPNConfig(
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        sr_ratios=[4, 2, 1, 1],
        hidden_sizes=[8, 16, 16, 32],
        num_attention_heads=[1, 1, 2, 2],
        mlp_ratios=[2, 2, 2, 2],
        decoder_hidden_size=16,
        max_depth=10,
        head_in_index=-1,
    )
    GLPNForDepthEstimation(config).eval().save_pretrained(out_dir)
    GLPNImageProcessor(size_divisor=32).save_pretrained(out_dir)
    return out_dir


def make_dpt(out_dir: Path, *, seed: int = 0, size: int = 32) -> Path:
    """A ViT-based DPT (hidden 16, 4 layers, patch 8) for depth; images resized to size² (aspect not kept)."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=size,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        head_in_index=-1,
        reassemble_factors=[4, 2, 1, 0.5],
        # At the default 0.02 the random network's depth is ~1e-10 everywhere; 0.2 gives maps in about
        # -2..50 with ReLU zeros, like a real DPT's relative inverse depth.
        initializer_range=0.2,
    )
    DPTForDepthEstimation(config).eval().save_pretrained(out_dir)
    DPTImageProcessor(size={"height": size, "width": size}).save_pretrained(out_dir)
    return out_dir


# -------------------------------------------------------------------------------------------------------
# Synthetic data: shapes with known class maps, gradients as depths


def shapes_scene(height: int, width: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image (H, W, 3), class-index map (H, W) uint8 over SEG_LABELS): a noisy background with a
    red square, a green disc and a blue bar at seeded positions; each class has its own colour, so a
    model can learn the map from the pixels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 140, size=(height, width, 3), dtype=np.uint8)
    labels = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    s = max(4, min(height, width) // 3)
    y0, x0 = rng.integers(0, height - s), rng.integers(0, width - s)
    square = (yy >= y0) & (yy < y0 + s) & (xx >= x0) & (xx < x0 + s)
    r = max(3, min(height, width) // 6)
    cy, cx = rng.integers(r, height - r), rng.integers(r, width - r)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    bar_y = rng.integers(0, height - 3)
    bar = (yy >= bar_y) & (yy < bar_y + max(2, height // 10))
    for cls, region, colour in (
        (1, square, (220, 30, 30)),
        (2, disc, (30, 200, 40)),
        (3, bar, (30, 40, 210)),
    ):
        labels[region] = cls
        image[region] = colour
    return image, labels


def gradient_scene(height: int, width: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, depth (H, W) float32 in metres): depth is a seeded linear ramp in 1..9 and the
    image's brightness encodes it, so a model can learn depth from the pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx / max(width - 1, 1) + np.sin(angle) * yy / max(height - 1, 1)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    depth = (1.0 + 8.0 * ramp).astype(np.float32)
    grey = (255 * (1 - ramp)).astype(np.uint8)
    image = np.stack([grey, grey // 2 + 64, 255 - grey], axis=-1).astype(np.uint8)
    return image, depth


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray, *, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# Sizes (H, W) that exercise aspect-ratio resizing, odd sizes and sizes below the processors' targets.
SIZES = ((48, 64), (64, 48), (40, 40), (57, 83), (96, 33), (32, 32), (70, 70), (45, 61))


def decoded(image_bytes: bytes) -> Any:
    """The RGB PIL image a pipeline sees for these bytes (what `load_image` does to a local file)."""
    from PIL import Image

    return Image.open(io.BytesIO(image_bytes)).convert("RGB")


def run_in_process(
    task_name: str, model_dir: Path, params: dict[str, Any], values: list[Any], *, batch_size: int = 4
) -> tuple[list[Any], list[Any]]:
    """The task's preprocess → runner → postprocess in this process, as the engine chains them (no Ray):
    ([output row or RowError per value], [raw runner outputs of the good rows]). Rows go to the runner in
    consecutive micro-batches of `batch_size`, mixing image sizes within a batch."""
    from models.registry import RowError, get_task

    task = get_task(task_name)
    parsed = task.parse_params(params, key="params")
    features = task.load_preprocessor(str(model_dir), parsed)(
        {"image": values, "__id": list(range(len(values)))}
    )
    runner = task.load_runner(str(model_dir), parsed, device="cpu", dtype="float32")
    post = task.load_postprocessor(str(model_dir), parsed)
    good = [f for f in features if not isinstance(f, RowError)]
    raw: list[Any] = []
    for start in range(0, len(good), batch_size):
        raw.extend(runner.forward(good[start : start + batch_size]))
    outputs = iter(raw)
    rows = [
        f
        if isinstance(f, RowError)
        else post(next(outputs), inputs={}, features={k: f[k] for k in task.postprocess_features})
        for f in features
    ]
    return rows, raw
