"""depth-estimation: GLPN, DPT and any `AutoModelForDepthEstimation` (Depth Anything, ZoeDepth, ...).

Input `image` (bytes, an HF Image struct {bytes, path}, or a path/URI; see `models.images`). Params:
`preview` (default false: also write the pipeline's 8-bit depth image as PNG bytes), `depth_dtype`
(float32 | float16, below), `max_pixels` (decompression-bomb guard of the image decoder), `storage_options`
(for image paths on object stores).

Output `depth`: the pipeline's `predicted_depth` at the original image size, as
    {data: binary, dtype: "float32" | "float16", shape: [height, width], min: float32, max: float32}
`data` is the map in row-major (C) order, little-endian, of `dtype`; `min`/`max` are those of the float32
map before encoding. `decode_depth(value)` gives the float32 (H, W) array back.
`depth_dtype: float32` (default) stores the map as computed. `depth_dtype: float16` halves the bytes where
that keeps every pixel within 1e-3 relative: |decoded - depth| <= 1e-3 * max(|depth|, 1e-3 * max|map|) (a
pixel's own value, or, for pixels below 0.1% of the map's largest magnitude — bicubic ringing around zero —
1e-6 of that magnitude); float16 rounds to 2^-11 relative, so maps whose largest |depth| lies in about
0.03..65504 qualify, and any other map is stored as float32 (the row's `dtype` says which). float16 is not
the default because 2^-11 relative is up to 0.016 absolute at depths of 32-64: more than "within 1e-3" of
the pipeline's depth when read absolutely (float32 here is within ~2e-4 of it, forward-pass rounding).
`preview` (with `preview: true`): PNG bytes of the pipeline's `depth` image, the map min-max scaled to 0-255.

Data path: decode + image processor on the CPU (uint8 pixels when the processor allows, see
`models.images`), forward on the replica returning `predicted_depth` (float32, at the model's resolution),
then `DepthEstimationPipeline.postprocess` itself on the CPU (the processor's `post_process_depth_estimation`
at the original size, and the preview image), so depth and preview are the pipeline's by construction.

Fine-tuning (`kind: finetune`, `training_labels: raw`): a depth-map column per image (this task's own
`depth` struct, an image's bytes — 16-bit PNG, float TIFF — or a nested list (H, W)), in metres or any unit
the model was trained in (`train.options.depth_scale` multiplies it, e.g. 0.001 for PNGs in millimetres).
Depth <= 0 marks pixels without ground truth (GLPN's loss skips them). Only models whose transformers
class computes a loss train (GLPN; DPT, Depth Anything and ZoeDepth raise NotImplementedError there).
`train.options`: `depth_scale`, `size` ([h, w] to resize every training pair to, for batches of mixed
sizes), `max_pixels`, `storage_options`. Eval accuracy is the depth literature's delta1: the share of valid
pixels with max(pred/true, true/pred) < 1.25.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from models.images import (
    DEFAULT_MAX_PIXELS,
    ImagePreprocessor,
    ShapeGroupedRunner,
    check_max_pixels,
    label_array,
    load_image_processor,
    model_outputs,
    training_images,
)
from models.metrics import depth_metrics, epoch_metrics
from models.registry import parse_params_dataclass, register_task
from pipeline.errors import ModelError, SpecError

__all__ = [
    "DEPTH_TYPE",
    "DepthEstimation",
    "DepthEstimationParams",
    "DepthTrainable",
    "DepthTrainingOptions",
    "decode_depth",
    "depth_map",
    "encode_depth",
]

DEPTH_TYPE = pa.struct(
    [
        ("data", pa.binary()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int32())),
        ("min", pa.float32()),
        ("max", pa.float32()),
    ]
)
# Relative error `depth_dtype: float16` allows before a map is stored as float32 instead (the issue's
# "depth within 1e-3"); float16's own rounding is 2^-11 = 4.9e-4.
_RTOL = 1e-3
_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


@dataclass(frozen=True)
class DepthEstimationParams:
    preview: bool = False
    depth_dtype: Literal["float32", "float16"] = "float32"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # fsspec options for `image` values that are remote paths (s3://...).
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DepthTrainingOptions:
    """`train.options` of a depth fine-tune."""

    # Multiplies the label column's values (e.g. 0.001 for 16-bit PNGs in millimetres → metres).
    depth_scale: float = 1.0
    # [height, width] every training image (and its depth map) is resized to before the image processor;
    # needed when a batch's images would otherwise come out of the processor at different sizes.
    size: tuple[int, int] | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: dict[str, Any] = field(default_factory=dict)


def encode_depth(depth: np.ndarray, *, depth_dtype: str = "float32") -> dict[str, Any]:
    """A float (H, W) depth map → the `depth` struct (see the module docstring)."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"a depth map is a 2-d (height, width) array, got shape {depth.shape}")
    data = depth.astype(_DTYPES["float32"])
    dtype = "float32"
    if depth_dtype == "float16":
        with np.errstate(over="ignore"):
            half = depth.astype(_DTYPES["float16"])
        scale = float(np.abs(depth).max()) if depth.size else 0.0
        error = np.abs(half.astype(np.float32) - depth)
        if np.isfinite(scale) and np.all(error <= _RTOL * np.maximum(np.abs(depth), _RTOL * scale)):
            data, dtype = half, "float16"
    finite = depth[np.isfinite(depth)]
    return {
        "data": data.tobytes(order="C"),
        "dtype": dtype,
        "shape": [int(s) for s in depth.shape],
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
    }


def decode_depth(value: Mapping[str, Any]) -> np.ndarray:
    """The `depth` struct → a float32 (H, W) array."""
    try:
        dtype = _DTYPES[value["dtype"]]
        shape = [int(s) for s in value["shape"]]
        data = value["data"]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"a depth value is a mapping with data, dtype (float16|float32) and shape, got {value!r:.80}"
        ) from e
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.float32)


class _Postprocessor:
    def __init__(self, model_dir: str, params: DepthEstimationParams) -> None:
        from transformers.pipelines.depth_estimation import DepthEstimationPipeline

        processor = load_image_processor(model_dir)
        if not hasattr(processor, "post_process_depth_estimation"):
            raise ModelError(
                f"{type(processor).__name__} in {model_dir!r} has no post_process_depth_estimation; "
                "point `model` at a depth-estimation checkpoint (GLPN, DPT, Depth Anything, ...)"
            )
        # The pipeline's postprocess reads only `self.image_processor`.
        self._pipe = SimpleNamespace(image_processor=processor)
        self._postprocess = DepthEstimationPipeline.postprocess
        self.params = params

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]:
        height, width = (int(v) for v in features["orig_size"])
        outputs = model_outputs(output)
        outputs["target_size"] = (height, width)  # the pipeline's `image.size[::-1]`
        with np.errstate(invalid="ignore", divide="ignore"):  # a constant map: the pipeline's preview is 0/0
            result = self._postprocess(self._pipe, outputs)
        depth = result["predicted_depth"].detach().cpu().numpy()  # (H, W) at the original size
        row: dict[str, Any] = {"depth": encode_depth(depth, depth_dtype=self.params.depth_dtype)}
        if self.params.preview:
            buf = io.BytesIO()
            result["depth"].save(buf, format="PNG")
            row["preview"] = buf.getvalue()
        return row


@register_task("depth-estimation")
class DepthEstimation:
    name = "depth-estimation"
    inputs = {"image": True}
    description = (
        "Monocular depth (GLPN, DPT, Depth Anything, ...): the depth map at the original size as "
        "{data, dtype, shape, min, max} (decode with models.depth_estimation.decode_depth) + optional PNG preview."
    )
    postprocess_inputs = ()
    postprocess_features = ("orig_size",)
    training_labels = "raw"
    training_text_inputs = ()

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> DepthEstimationParams:
        p = parse_params_dataclass(DepthEstimationParams, params, key=key)
        check_max_pixels(p.max_pixels, key=f"{key}.max_pixels")
        return p

    def output_schema(self, params: DepthEstimationParams) -> pa.Schema:
        fields = [("depth", DEPTH_TYPE)]
        if params.preview:
            fields.append(("preview", pa.binary()))
        return pa.schema(fields)

    def load_preprocessor(self, model_dir: str, params: DepthEstimationParams) -> ImagePreprocessor:
        return ImagePreprocessor(model_dir, params)

    def load_runner(
        self, model_dir: str, params: DepthEstimationParams, *, device: str, dtype: str
    ) -> ShapeGroupedRunner:
        from transformers import AutoModelForDepthEstimation

        return ShapeGroupedRunner.load(
            AutoModelForDepthEstimation, model_dir, fields=("predicted_depth",), device=device, dtype=dtype
        )

    def load_postprocessor(self, model_dir: str, params: DepthEstimationParams) -> _Postprocessor:
        return _Postprocessor(model_dir, params)

    def parse_training_options(self, options: Mapping[str, Any], *, key: str) -> DepthTrainingOptions:
        opts = parse_params_dataclass(DepthTrainingOptions, options, key=key)
        check_max_pixels(opts.max_pixels, key=f"{key}.max_pixels")
        if not opts.depth_scale > 0:
            raise SpecError(f"{key}.depth_scale", f"must be > 0, got {opts.depth_scale}")
        if opts.size is not None and min(opts.size) < 1:
            raise SpecError(f"{key}.size", f"is [height, width] in pixels, got {list(opts.size)}")
        return opts

    def training(
        self,
        base_dir: str,
        *,
        label_names: tuple[str, ...],
        max_length: int,
        options: Mapping[str, Any] | None = None,
    ) -> DepthTrainable:
        """`models.registry.FineTunable` (label names play no part in depth)."""
        opts = self.parse_training_options(options or {}, key="train.options")
        return DepthTrainable(base_dir, options=opts)


# --- fine-tuning ------------------------------------------------------------------------------------------


def depth_map(value: Any, *, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """One depth label → a float32 (H, W) map. Accepts this task's `depth` struct, image bytes (16-bit PNG,
    float TIFF, ...), an HF Image struct {bytes, path}, a path/URI, a nested list (H, W) or an array.
    Raises ValueError saying what is wrong with the value."""
    if isinstance(value, Mapping) and "data" in value and "shape" in value:
        return decode_depth(value)
    array = label_array(
        value,
        what="the depth map",
        if_null="the depth map is null; every training image needs one",
        dtype=np.float32,
        storage_options=storage_options,
    )
    if array.ndim != 2:
        raise ValueError(f"a depth map is a single-channel (H, W) array, got shape {array.shape}")
    return array.astype(np.float32)


class DepthTrainable:
    """Training-side view of depth estimation: the model's own loss (GLPN: scale-invariant log loss over
    pixels with depth > 0) against the label column's depth maps, resized (nearest) to the processed size.

    Models whose transformers class has no training loss (DPT, Depth Anything, ZoeDepth raise
    NotImplementedError for `labels`) are refused when the model is built. Rows whose image does not
    decode are dropped with a warning; a malformed depth map fails the step with the row named."""

    def __init__(self, base_dir: str, *, options: DepthTrainingOptions | None = None) -> None:
        self.options = options or DepthTrainingOptions()
        self.processor = load_image_processor(base_dir)

    def build_model(self, weights_dir: str) -> Any:
        import torch
        from PIL import Image
        from transformers import AutoModelForDepthEstimation

        model = AutoModelForDepthEstimation.from_pretrained(weights_dir, use_safetensors=True)
        # One tiny forward with labels: transformers' depth classes either compute a loss or raise.
        probe = self.processor(images=[Image.new("RGB", (64, 64), (128, 128, 128))], return_tensors="pt")
        pixels = probe["pixel_values"]
        try:
            with torch.no_grad():
                model.eval()(pixel_values=pixels, labels=torch.ones(1, *pixels.shape[-2:]))
        except NotImplementedError as e:
            raise ModelError(
                f"{type(model).__name__} has no training loss in transformers ({e}); depth fine-tuning "
                "needs a model that computes one, such as GLPN (GLPNForDepthEstimation)"
            ) from e
        return model.train()

    def encode(self, columns: Mapping[str, list[Any]], labels: list[Any]) -> dict[str, Any]:
        """Rows → {pixel_values (B, C, H, W), labels (B, H, W) float32 depth}."""
        import torch
        import torch.nn.functional as F
        from PIL import Image

        opts = self.options
        keep, images = training_images(
            columns["image"], max_pixels=opts.max_pixels, storage_options=opts.storage_options
        )
        kept, depths = [], []
        for i, image in zip(keep, images, strict=True):
            try:
                depth = depth_map(labels[i], storage_options=opts.storage_options) * np.float32(
                    opts.depth_scale
                )
                if depth.shape != (image.height, image.width):
                    raise ValueError(
                        f"the depth map is {depth.shape[1]}x{depth.shape[0]} but its image is "
                        f"{image.width}x{image.height}; depth maps must have their image's size"
                    )
            except ValueError as e:
                raise ValueError(f"training row {i} of this batch: {e}") from e
            if opts.size is not None:
                height, width = opts.size
                image = image.resize((width, height), Image.BILINEAR)
                depth = np.array(Image.fromarray(depth, mode="F").resize((width, height), Image.NEAREST))
            kept.append(image)
            depths.append(depth)
        try:
            pixels = self.processor(images=kept, return_tensors="pt")["pixel_values"]  # (B, C, H, W)
        except ValueError as e:  # tensors of different sizes cannot stack
            sizes = sorted({(im.height, im.width) for im in kept})
            raise ValueError(
                f"the images of this batch come out of the image processor at different sizes ({e}); their "
                f"sizes (H, W): {sizes[:4]}. Set train.options.size: [height, width] to resize them all"
            ) from e
        targets = torch.stack(
            [
                F.interpolate(torch.from_numpy(d)[None, None], size=pixels.shape[-2:], mode="nearest")[0, 0]
                for d in depths
            ]
        )  # (B, H, W)
        # `_depths` is not a model input: the depth maps at their images' size, for eval_predictions.
        return {"pixel_values": pixels, "labels": targets, "_depths": depths}

    # Task metrics per epoch (pipeline.train.loop): δ1 (share of pixels within 1.25× of the truth) picks the best
    # epoch; abs_rel and rmse are reported beside it.
    eval_score = ("eval_delta1", "max")

    def eval_predictions(self, output: Any, batch: Mapping[str, Any], *, model: Any) -> list[tuple[Any, Any]]:
        """({"depth": (H, W) predicted depth}, (H, W) label depth) per eval image: the image processor's
        `post_process_depth_estimation` resizes the prediction to the label's size (pixels with no positive
        label depth are not scored)."""
        depths = batch["_depths"]
        found = self.processor.post_process_depth_estimation(
            type(output)(predicted_depth=output.predicted_depth.detach().float()),
            target_sizes=[d.shape for d in depths],
        )
        return [
            ({"depth": r["predicted_depth"].cpu().numpy()}, d) for r, d in zip(found, depths, strict=True)
        ]

    def eval_metrics(self, pairs: list[tuple[Any, Any]]) -> dict[str, float]:
        keys = {"delta1": "eval_delta1", "abs_rel": "eval_abs_rel", "rmse": "eval_rmse"}
        return epoch_metrics(depth_metrics, pairs, keys)

    def eval_counts(self, output: Any, batch: Mapping[str, Any]) -> tuple[float, float]:
        """(pixels with max(pred/true, true/pred) < 1.25, pixels with true depth > 0): delta1 accuracy."""
        import torch.nn.functional as F

        truth = batch["labels"]  # (B, H, W)
        pred = output.predicted_depth.float()
        if pred.shape[-2:] != truth.shape[-2:]:
            pred = F.interpolate(pred[:, None], size=truth.shape[-2:], mode="bilinear", align_corners=False)[
                :, 0
            ]
        valid = truth > 0
        ratio = (pred[valid].clamp(min=1e-6) / truth[valid]).float()
        hits = (ratio.maximum(1 / ratio) < 1.25).sum().item()
        return float(hits), float(valid.sum().item())

    def save(self, model: Any, out_dir: str) -> None:
        """A folder that `kind: inference` (and `pipeline("depth-estimation")`) loads."""
        model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
