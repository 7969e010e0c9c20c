"""Builders for the vision tests: tiny random ViT / ConvNeXT / DETR models with their image processors saved
to a folder, and synthetic images (noise, shapes with known boxes) encoded as JPEG/PNG bytes.

Nothing is downloaded: every model is `from_config`, DETR's backbone is a tiny transformers ResNet
(`use_pretrained_backbone=False`, no timm)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np

CLASS_NAMES = ("cat", "dog", "bird", "fish", "frog")
SHAPE_NAMES = ("square", "disc", "bar")


def _labels(names: tuple[str, ...]) -> dict[str, Any]:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def make_vit_classifier(out_dir: Path, *, seed: int = 0, image_size: int = 32, labels=CLASS_NAMES) -> Path:
    """A 2-layer ViT (hidden 32, 8-px patches) + ViTImageProcessor resizing to image_size², as safetensors."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(labels),
        **_labels(tuple(labels)),
    )
    ViTForImageClassification(config).eval().save_pretrained(out_dir)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    return out_dir


def make_convnext_classifier(
    out_dir: Path, *, seed: int = 0, image_size: int = 32, labels=CLASS_NAMES
) -> Path:
    """A 2-stage ConvNeXT (16/32 channels) + ConvNextImageProcessor (shortest edge → crop_pct resize + crop)."""
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessorPil

    torch.manual_seed(seed)
    config = ConvNextConfig(
        num_stages=2,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_labels=len(labels),
        **_labels(tuple(labels)),
    )
    ConvNextForImageClassification(config).eval().save_pretrained(out_dir)
    ConvNextImageProcessorPil(size={"shortest_edge": image_size}, crop_pct=0.875).save_pretrained(out_dir)
    return out_dir


def make_detr(
    out_dir: Path, *, seed: int = 0, labels=SHAPE_NAMES, shortest_edge: int = 64, longest_edge: int = 96
) -> Path:
    """A tiny DETR (1+1 layers, d_model 32, 12 queries) on a tiny random ResNet backbone + DetrImageProcessor."""
    import torch
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil, ResNetConfig

    torch.manual_seed(seed)
    backbone = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage4"],
    )
    config = DetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=12,
        num_labels=len(labels),
        **_labels(tuple(labels)),
    )
    DetrForObjectDetection(config).eval().save_pretrained(out_dir)
    DetrImageProcessorPil(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge}
    ).save_pretrained(out_dir)
    return out_dir


def encode(image: Any, fmt: str = "PNG", **save_kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def noise_image(seed: int, *, width: int | None = None, height: int | None = None, mode: str = "RGB") -> Any:
    """A smooth-ish random RGB image (upsampled noise) of a random size in 24–90 px unless given."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width = width or int(rng.integers(24, 90))
    height = height or int(rng.integers(24, 90))
    small = rng.integers(0, 256, size=(max(2, height // 6), max(2, width // 6), 3), dtype=np.uint8)
    image = Image.fromarray(small, mode="RGB").resize((width, height), Image.BILINEAR)
    return image.convert(mode) if mode != "RGB" else image


def noise_images(n: int, *, seed: int = 0, fmt: str = "PNG") -> list[bytes]:
    """n encoded noise images of varied sizes (PNG: lossless, so any decoder gives the same pixels)."""
    return [encode(noise_image(seed * 10_000 + i), fmt) for i in range(n)]


def shapes_image(
    seed: int, *, size: tuple[int, int] = (96, 64), max_objects: int = 3
) -> tuple[Any, list[dict]]:
    """A picture of 1–max_objects filled shapes on a plain background, and its COCO-style annotations:
    [{"bbox": [x, y, w, h], "category_id": i}] with i indexing SHAPE_NAMES (square, disc, bar)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(rng.randint(0, 60) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(rng.randint(1, max_objects)):
        cat = rng.randrange(len(SHAPE_NAMES))
        w = rng.randint(12, width // 2)
        h = w if cat < 2 else rng.randint(6, 10)
        x, y = rng.randint(0, width - w - 1), rng.randint(0, height - h - 1)
        color = tuple(rng.randint(120, 255) for _ in range(3))
        if cat == 1:
            draw.ellipse([x, y, x + w, y + h], fill=color)
        else:
            draw.rectangle([x, y, x + w, y + h], fill=color)
        objects.append({"bbox": [float(x), float(y), float(w + 1), float(h + 1)], "category_id": cat})
    return image, objects


COLOR_NAMES = ("red", "green", "blue")


def color_images(n: int, *, seed: int = 0) -> tuple[list[bytes], list[str]]:
    """n JPEG images of random size whose label is the dominant colour channel (red/green/blue), under
    noise: an easy rule a tiny model learns in a few dozen steps."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        k = int(rng.integers(0, 3))
        height, width = int(rng.integers(28, 72)), int(rng.integers(28, 72))
        pixels = rng.integers(0, 120, size=(height, width, 3))
        pixels[..., k] += 110
        images.append(encode(Image.fromarray(pixels.astype(np.uint8), mode="RGB"), "JPEG", quality=90))
        labels.append(COLOR_NAMES[k])
    return images, labels
