"""image-segmentation: Mask2Former (semantic / instance / panoptic), SegFormer (semantic) and any model
`transformers.pipeline("image-segmentation")` accepts (its image processor must have the
`post_process_*_segmentation` method the subtask needs).

Input `image` (bytes, an HF Image struct {bytes, path}, or a path/URI; see `models.images`). Params are the
pipeline's: `subtask` (semantic | instance | panoptic | null = the first the processor supports, in the
order panoptic, instance, semantic), `threshold` (0.9), `mask_threshold` (0.5), `overlap_mask_area_threshold`
(0.5); plus `max_pixels` (decompression-bomb guard of the image decoder) and `storage_options` (for
image paths on object stores).

Output `segments`: list of {label, score, mask}, as the pipeline returns them (score is null for semantic
segmentation, as there). `mask` is the segment's binary mask at the original image size in COCO
run-length encoding {size: [height, width], counts: str} (`models.masks`); `decode_mask(mask)` gives the
boolean (H, W) array back.

Data path:
- preprocess (CPU): decode (`models.images`), run the model's image processor with rescale/normalize off
  so the resized pixels travel as uint8 (C, H, W) (checked once per processor; else float32), plus the
  original (height, width) for the postprocess;
- runner: rescale/normalize on the device, forward rows of the same processed size together (never padded
  to each other), return only the logits the processor's postprocess reads, as float32 (SegFormer:
  `logits` (num_labels, H/4, W/4); Mask2Former: `class_queries_logits` (Q, num_labels + 1) and
  `masks_queries_logits` (Q, H/4, W/4)). Not float16: rounding the logits to it changed the masks of 2 of
  8 SegFormer images and 2-4 of 8 Mask2Former instance/panoptic images in the parity set;
- postprocess (CPU): `ImageSegmentationPipeline.postprocess` itself (which calls the processor's
  `post_process_{panoptic,instance,semantic}_segmentation` with target size = original size), then each
  PIL mask → COCO RLE. Labels, scores and masks are the pipeline's by construction.

Fine-tuning (`kind: finetune`, `training_labels: raw`): semantic segmentation from a mask column holding
class-index maps (PNG/any image bytes, an HF Image struct, or a nested list (H, W) of class ids) at the
image's size; SegFormer-style models (`labels` = the map) and Mask2Former (`mask_labels`/`class_labels`
built by its image processor). `train.options`: `ignore_index` (default 255: pixels with this value carry
no loss), `max_pixels`, `storage_options`. Eval accuracy is pixel accuracy over non-ignored pixels at the
processed size.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from models.classification import label_maps
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
from models.masks import RLE_TYPE, decode_mask, encode_mask
from models.metrics import IGNORE_INDEX, epoch_metrics, segmentation_metrics
from models.registry import parse_params_dataclass, register_task
from pipeline.errors import ModelError, SpecError

__all__ = [
    "SEGMENT_TYPE",
    "ImageSegmentation",
    "ImageSegmentationParams",
    "SegmentationTrainable",
    "SegmentationTrainingOptions",
    "class_map",
    "decode_mask",
    "encode_mask",
]

SEGMENT_TYPE = pa.struct([("label", pa.string()), ("score", pa.float64()), ("mask", RLE_TYPE)])

# Model output fields the processors' post_process_*_segmentation methods read (DETR panoptic reads
# logits + pred_masks + pred_boxes; MaskFormer/Mask2Former the two query logits; SegFormer/DPT/BEiT logits).
# Everything else a model returns (hidden states, auxiliary logits) stays on the device.
_OUTPUT_FIELDS = ("logits", "pred_masks", "pred_boxes", "class_queries_logits", "masks_queries_logits")
_SUBTASK_ORDER = ("panoptic", "instance", "semantic")


@dataclass(frozen=True)
class ImageSegmentationParams:
    subtask: Literal["semantic", "instance", "panoptic"] | None = None
    threshold: float = 0.9
    mask_threshold: float = 0.5
    overlap_mask_area_threshold: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS
    # fsspec options for `image` values that are remote paths (s3://...).
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SegmentationTrainingOptions:
    """`train.options` of a semantic-segmentation fine-tune."""

    # Mask pixels with this value carry no loss and no accuracy (unlabelled / "void").
    ignore_index: int = 255
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: dict[str, Any] = field(default_factory=dict)


def _model_class(config: Any) -> Any:
    """The auto class the pipeline would use: image, semantic, then universal/instance segmentation."""
    import transformers

    if type(config).__name__ == "OneFormerConfig":
        raise ModelError(
            "OneFormer needs tokenized task inputs, which shardwise's image-segmentation does not build; "
            "use Mask2Former, MaskFormer, SegFormer, DETR panoptic or another segmentation model"
        )
    autos = (
        transformers.AutoModelForImageSegmentation,
        transformers.AutoModelForSemanticSegmentation,
        transformers.AutoModelForUniversalSegmentation,
        transformers.AutoModelForInstanceSegmentation,
    )
    for auto in autos:
        if type(config) in auto._model_mapping:
            return auto
    raise ModelError(
        f"{type(config).__name__} is not an image-segmentation model (no AutoModelFor*Segmentation class "
        "maps it); point `model` at a segmentation checkpoint such as SegFormer or Mask2Former"
    )


def resolve_subtask(processor: Any, subtask: str | None) -> str:
    """The subtask the pipeline's postprocess runs for `subtask` with this processor; ModelError if none."""
    supported = [s for s in _SUBTASK_ORDER if hasattr(processor, f"post_process_{s}_segmentation")]
    for s in supported:
        if subtask in (s, None):
            return s
    raise ModelError(
        f"params.subtask {subtask!r} is not supported by {type(processor).__name__} (it post-processes "
        f"{supported or 'no segmentation'}); set params.subtask to one of {supported} or leave it null"
    )


class _Postprocessor:
    def __init__(self, model_dir: str, params: ImageSegmentationParams) -> None:
        from transformers import AutoConfig
        from transformers.pipelines.image_segmentation import ImageSegmentationPipeline

        processor = load_image_processor(model_dir)
        self.subtask = resolve_subtask(processor, params.subtask)
        # The pipeline's postprocess reads only `self.image_processor` and `self.model.config.id2label`.
        self._pipe = SimpleNamespace(
            image_processor=processor,
            model=SimpleNamespace(config=AutoConfig.from_pretrained(model_dir)),
        )
        self._postprocess = ImageSegmentationPipeline.postprocess
        self.kwargs = {
            "subtask": self.subtask,
            "threshold": params.threshold,
            "mask_threshold": params.mask_threshold,
            "overlap_mask_area_threshold": params.overlap_mask_area_threshold,
        }
        # Mask2Former/MaskFormer panoptic warns "label_ids_to_fuse unset" on every call (the pipeline never
        # sets it): once per row would flood the worker logs.
        logging.getLogger(type(processor).__module__).addFilter(_drop_fuse_warning)

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]:
        height, width = (int(v) for v in features["orig_size"])
        outputs = model_outputs(output)
        outputs["target_size"] = [(height, width)]
        annotation = self._postprocess(self._pipe, outputs, **self.kwargs)
        return {
            "segments": [
                {
                    "label": a["label"],
                    "score": a["score"],
                    "mask": encode_mask(np.asarray(a["mask"]) > 0),  # PIL "L" 0/255 → bool (H, W)
                }
                for a in annotation
            ]
        }


def _drop_fuse_warning(record: Any) -> bool:
    return "label_ids_to_fuse" not in str(record.msg)


@register_task("image-segmentation")
class ImageSegmentation:
    name = "image-segmentation"
    inputs = {"image": True}
    description = (
        "Semantic, instance or panoptic segmentation (Mask2Former, SegFormer, ...): segments of "
        "{label, score, mask as COCO RLE at the original size} per image."
    )
    postprocess_inputs = ()
    postprocess_features = ("orig_size",)
    training_labels = "raw"
    training_text_inputs = ()

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> ImageSegmentationParams:
        p = parse_params_dataclass(ImageSegmentationParams, params, key=key)
        for name in ("threshold", "mask_threshold", "overlap_mask_area_threshold"):
            value = getattr(p, name)
            if not 0.0 <= value <= 1.0:
                raise SpecError(f"{key}.{name}", f"must be between 0 and 1, got {value}")
        check_max_pixels(p.max_pixels, key=f"{key}.max_pixels")
        return p

    def output_schema(self, params: ImageSegmentationParams) -> pa.Schema:
        return pa.schema([("segments", pa.list_(SEGMENT_TYPE))])

    def load_preprocessor(self, model_dir: str, params: ImageSegmentationParams) -> ImagePreprocessor:
        return ImagePreprocessor(model_dir, params)

    def load_runner(
        self, model_dir: str, params: ImageSegmentationParams, *, device: str, dtype: str
    ) -> ShapeGroupedRunner:
        from transformers import AutoConfig

        auto = _model_class(AutoConfig.from_pretrained(model_dir))
        return ShapeGroupedRunner.load(auto, model_dir, fields=_OUTPUT_FIELDS, device=device, dtype=dtype)

    def load_postprocessor(self, model_dir: str, params: ImageSegmentationParams) -> _Postprocessor:
        return _Postprocessor(model_dir, params)

    def parse_training_options(self, options: Mapping[str, Any], *, key: str) -> SegmentationTrainingOptions:
        opts = parse_params_dataclass(SegmentationTrainingOptions, options, key=key)
        check_max_pixels(opts.max_pixels, key=f"{key}.max_pixels")
        if not 0 <= opts.ignore_index <= 255:
            raise SpecError(f"{key}.ignore_index", f"must be a mask value in 0..255, got {opts.ignore_index}")
        return opts

    def training(
        self,
        base_dir: str,
        *,
        label_names: tuple[str, ...],
        max_length: int,
        options: Mapping[str, Any] | None = None,
    ) -> SegmentationTrainable:
        """`models.registry.FineTunable`. `label_names` (train.label_names) name the class ids of the masks in
        id order; empty: the base model's labels are kept."""
        opts = self.parse_training_options(options or {}, key="train.options")
        return SegmentationTrainable(base_dir, label_names=label_names, options=opts)


# --- fine-tuning ------------------------------------------------------------------------------------------


def class_map(value: Any, *, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """One mask value → a (H, W) uint8 class-index map. Accepts image bytes (PNG of class ids, mode L/P or
    16-bit), an HF Image struct {bytes, path}, a path/URI, a nested list (H, W) of ids or an array.
    Raises ValueError saying what is wrong with the value."""
    array = label_array(
        value,
        what="the mask",
        if_null="the mask is null; every training image needs its class-index map",
        storage_options=storage_options,
    )
    if array.ndim != 2:
        raise ValueError(
            f"a mask is a single-channel (H, W) map of class ids, got an array of shape {array.shape}; save "
            "class maps as 8-bit grayscale (mode L) or palette (P) PNGs, not RGB"
        )
    if array.size and (not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255):
        raise ValueError(
            f"mask values must be integer class ids in 0..255 (dtype {array.dtype}, range "
            f"{array.min()}..{array.max()}); image processors carry class maps as 8-bit images"
        )
    return array.astype(np.uint8)


class SegmentationTrainable:
    """Training-side view of semantic segmentation.

    The label column holds one class-index map per image, at the image's size (see `class_map`); values
    are ids into the model's labels (or `train.label_names`), `options.ignore_index` marks void pixels.
    The image processor resizes image and map together (nearest for the map). SegFormer-style models get
    `labels` (B, H, W); Mask2Former/MaskFormer get per-image `mask_labels` (one binary mask per class
    present) and `class_labels`, built by their processor. Rows whose image does not decode are dropped
    with a warning; a malformed mask fails the step with the row named."""

    def __init__(
        self,
        base_dir: str,
        *,
        label_names: tuple[str, ...],
        options: SegmentationTrainingOptions | None = None,
    ) -> None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base_dir)
        self.auto = _model_class(config)
        model_class = self.auto._model_mapping[type(config)]
        # Mask2Former, MaskFormer: mask classification with Hungarian matching; else per-pixel `labels`.
        self.universal = "mask_labels" in inspect.signature(model_class.forward).parameters
        self.label_names = label_names
        self.num_labels = len(label_names) if label_names else int(config.num_labels)
        self.options = options or SegmentationTrainingOptions()
        self.processor = load_image_processor(base_dir)

    def build_model(self, weights_dir: str) -> Any:
        kwargs: dict[str, Any] = {}
        if self.label_names:
            # A class head of another size starts fresh.
            kwargs = {**label_maps(self.label_names), "ignore_mismatched_sizes": True}
        if not self.universal:
            kwargs["semantic_loss_ignore_index"] = self.options.ignore_index  # SegFormer/BEiT/DPT's CE loss
        return self.auto.from_pretrained(weights_dir, use_safetensors=True, **kwargs)

    def encode(self, columns: Mapping[str, list[Any]], labels: list[Any]) -> dict[str, Any]:
        """Rows → SegFormer: {pixel_values (B, C, H, W), labels (B, H, W)}; Mask2Former: {pixel_values,
        pixel_mask (B, H, W), mask_labels [(n_i, H, W)], class_labels [(n_i,)]}."""
        keep, images = training_images(
            columns["image"], max_pixels=self.options.max_pixels, storage_options=self.options.storage_options
        )
        maps = []
        for i, image in zip(keep, images, strict=True):
            try:
                cmap = class_map(labels[i], storage_options=self.options.storage_options)
                if cmap.shape != (image.height, image.width):
                    raise ValueError(
                        f"the mask is {cmap.shape[1]}x{cmap.shape[0]} but its image is "
                        f"{image.width}x{image.height}; masks must have their image's size"
                    )
                bad_ids = sorted(
                    set(np.unique(cmap).tolist()) - set(range(self.num_labels)) - {self.options.ignore_index}
                )
                if bad_ids:
                    raise ValueError(
                        f"the mask holds class ids {bad_ids[:5]} outside 0..{self.num_labels - 1} (and "
                        f"ignore_index {self.options.ignore_index}); fix the masks, set train.label_names to "
                        "name every class, or set train.options.ignore_index"
                    )
            except ValueError as e:
                raise ValueError(f"training row {i} of this batch: {e}") from e
            maps.append(cmap)
        # Not model inputs: the class maps at their images' size, the references of eval_predictions.
        extras = {"_maps": maps}
        if self.universal:
            enc = self.processor(
                images=images,
                segmentation_maps=maps,
                ignore_index=self.options.ignore_index,
                return_tensors="pt",
            )
            return {
                "pixel_values": enc["pixel_values"],
                "pixel_mask": enc["pixel_mask"],
                "mask_labels": list(enc["mask_labels"]),
                "class_labels": list(enc["class_labels"]),
                **extras,
            }
        enc = self.processor(images=images, segmentation_maps=maps, return_tensors="pt")
        return {"pixel_values": enc["pixel_values"], "labels": enc["labels"].long(), **extras}

    # Task metrics per epoch (pipeline.train.loop): mean IoU over the classes picks the best epoch.
    eval_score = ("eval_mean_iou", "max")

    def eval_predictions(self, output: Any, batch: Mapping[str, Any], *, model: Any) -> list[tuple[Any, Any]]:
        """({"segments": [{label, mask (RLE)}]}, class-index map) per eval image: the image processor's
        `post_process_semantic_segmentation` at the map's size (SegFormer: upsampled logits' argmax;
        Mask2Former: its class-weighted masks), against the map with ignore_index as 255 (not scored)."""
        maps = batch["_maps"]
        found = self.processor.post_process_semantic_segmentation(
            output, target_sizes=[m.shape for m in maps]
        )
        pairs = []
        for predicted, gold in zip(found, maps, strict=True):
            predicted = predicted.detach().cpu().numpy()  # (H, W) class ids
            segments = [{"label": int(c), "mask": encode_mask(predicted == c)} for c in np.unique(predicted)]
            if self.options.ignore_index != IGNORE_INDEX:
                gold = np.where(gold == self.options.ignore_index, IGNORE_INDEX, gold)
            pairs.append(({"segments": segments}, gold))
        return pairs

    def eval_metrics(self, pairs: list[tuple[Any, Any]]) -> dict[str, float]:
        keys = {"mean_iou": "eval_mean_iou", "pixel_accuracy": "eval_pixel_accuracy"}
        return epoch_metrics(segmentation_metrics, pairs, keys)

    def eval_counts(self, output: Any, batch: Mapping[str, Any]) -> tuple[float, float]:
        """(correct pixels, labelled pixels) at the processed size: the predicted class map (argmax of the
        logits, or Mask2Former's class-weighted mask probabilities as its semantic postprocess builds them)
        against the labels, ignore_index excluded. Reported by pipeline.train.loop as eval_accuracy."""
        import torch
        import torch.nn.functional as F

        ignore = self.options.ignore_index
        if self.universal:
            pixels = batch["pixel_values"]
            classes = output.class_queries_logits.float().softmax(-1)[..., :-1]  # (B, Q, C)
            masks = F.interpolate(
                output.masks_queries_logits.float(),
                size=pixels.shape[-2:],
                mode="bilinear",
                align_corners=False,
            ).sigmoid()  # (B, Q, H, W)
            pred = torch.einsum("bqc,bqhw->bchw", classes, masks).argmax(1)  # (B, H, W)
            truth = torch.full_like(pred, ignore)
            for b, (mask_labels, class_labels) in enumerate(
                zip(batch["mask_labels"], batch["class_labels"], strict=True)
            ):
                for mask, cls in zip(mask_labels, class_labels, strict=True):
                    truth[b][mask > 0.5] = cls
            valid = (truth != ignore) & (batch["pixel_mask"] > 0)
        else:
            truth = batch["labels"]  # (B, H, W)
            logits = F.interpolate(
                output.logits.float(), size=truth.shape[-2:], mode="bilinear", align_corners=False
            )
            pred = logits.argmax(1)
            valid = truth != ignore
        hits = ((pred == truth) & valid).sum().item()
        return float(hits), float(valid.sum().item())

    def save(self, model: Any, out_dir: str) -> None:
        """A folder that `kind: inference` (and `pipeline("image-segmentation")`) loads."""
        model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
