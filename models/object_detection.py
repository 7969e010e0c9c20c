"""object-detection: DETR and any `AutoModelForObjectDetection` whose image processor has
`post_process_object_detection` (Conditional/Deformable DETR, YOLOS, RT-DETR, ...).

Input `image` (bytes, {bytes, path} struct or path/URI; see `models.images`). Params follow
`transformers.pipeline("object-detection")`: `threshold` (default 0.5); plus `max_pixels` and
`storage_options` as in image-classification. Output `objects`: a list of {label, score, box {xmin, ymin,
xmax, ymax}} in original-image pixels (integers, truncated as the pipeline does).

CPU preprocess: decode, then the processor's resize with rescale/normalize off → uint8 (C, H, W) plus the
original (height, width). The replica normalises on its device and runs the model on same-size groups (no
cross-row padding: zero padding would change a CNN backbone's features, so results equal the pipeline's
one-image batches). Postprocess: the pipeline's own `ObjectDetectionPipeline.postprocess`, i.e. the
processor's `post_process_object_detection` with the original size as target size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa

from models.classification import label_maps
from models.images import (
    DEFAULT_MAX_PIXELS,
    ImagePreprocessor,
    ShapeGroupedRunner,
    check_max_pixels,
    load_image_processor,
    model_outputs,
    training_images,
)
from models.metrics import detection_metrics, epoch_metrics
from models.registry import parse_params_dataclass, register_task
from pipeline.errors import SpecError

__all__ = [
    "DetectionTrainingOptions",
    "ObjectDetection",
    "ObjectDetectionParams",
    "ObjectDetectionTrainable",
    "coco_annotations",
]


@dataclass(frozen=True)
class ObjectDetectionParams:
    threshold: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DetectionTrainingOptions:
    """`train.options` of an object-detection fine-tune."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Eval: a ground-truth box counts as found when the query overlapping it most (IoU >= this) predicts
    # its class.
    eval_iou: float = 0.5


_BOX = pa.struct([("xmin", pa.int32()), ("ymin", pa.int32()), ("xmax", pa.int32()), ("ymax", pa.int32())])
_OBJECT = pa.struct([("label", pa.string()), ("score", pa.float64()), ("box", _BOX)])
# The raw outputs every DETR-family post_process_object_detection reads.
_OUTPUTS = ("logits", "pred_boxes")


class _Postprocessor:
    def __init__(self, model_dir: str, params: ObjectDetectionParams) -> None:
        from transformers import AutoConfig
        from transformers.pipelines.object_detection import ObjectDetectionPipeline

        # The pipeline's postprocess reads the processor, the config, `tokenizer` (LayoutLM variants only)
        # and its own `_get_bounding_box`; calling it keeps parity by construction.
        self._pipe = SimpleNamespace(
            model=SimpleNamespace(config=AutoConfig.from_pretrained(model_dir)),
            image_processor=load_image_processor(model_dir),
            tokenizer=None,
        )
        self._pipe._get_bounding_box = lambda box: ObjectDetectionPipeline._get_bounding_box(self._pipe, box)
        self._postprocess = ObjectDetectionPipeline.postprocess
        self.threshold = params.threshold

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]:
        import torch

        outputs = model_outputs({name: output[name] for name in _OUTPUTS})
        outputs["target_size"] = torch.from_numpy(np.array(features["orig_size"], dtype=np.int32))[
            None
        ]  # (1, 2)
        objects = self._postprocess(self._pipe, outputs, threshold=self.threshold)
        return {"objects": [{"label": o["label"], "score": o["score"], "box": o["box"]} for o in objects]}


@register_task("object-detection")
class ObjectDetection:
    name = "object-detection"
    inputs = {"image": True}
    description = "Object detection (DETR family): objects with label, score and box per image."
    postprocess_inputs = ()
    postprocess_features = ("orig_size",)
    # Fine-tuning (pipeline.train): the label column holds COCO-style objects per image, read as Python values.
    training_labels = "raw"
    training_text_inputs: tuple[str, ...] = ()

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> ObjectDetectionParams:
        p = parse_params_dataclass(ObjectDetectionParams, params, key=key)
        if not 0.0 <= p.threshold <= 1.0:
            raise SpecError(f"{key}.threshold", f"is a score threshold in [0, 1], got {p.threshold}")
        check_max_pixels(p.max_pixels, key=f"{key}.max_pixels")
        return p

    def output_schema(self, params: ObjectDetectionParams) -> pa.Schema:
        return pa.schema([("objects", pa.list_(_OBJECT))])

    def load_preprocessor(self, model_dir: str, params: ObjectDetectionParams) -> ImagePreprocessor:
        return ImagePreprocessor(model_dir, params)

    def load_runner(
        self, model_dir: str, params: ObjectDetectionParams, *, device: str, dtype: str
    ) -> ShapeGroupedRunner:
        from transformers import AutoModelForObjectDetection

        # logits (B, Q, C+1), pred_boxes (B, Q, 4)
        return ShapeGroupedRunner.load(
            AutoModelForObjectDetection, model_dir, fields=_OUTPUTS, device=device, dtype=dtype
        )

    def load_postprocessor(self, model_dir: str, params: ObjectDetectionParams) -> _Postprocessor:
        return _Postprocessor(model_dir, params)

    def parse_training_options(self, options: Mapping[str, Any], *, key: str) -> DetectionTrainingOptions:
        opts = parse_params_dataclass(DetectionTrainingOptions, options, key=key)
        check_max_pixels(opts.max_pixels, key=f"{key}.max_pixels")
        if not 0.0 < opts.eval_iou <= 1.0:
            raise SpecError(f"{key}.eval_iou", f"is an IoU in (0, 1], got {opts.eval_iou}")
        return opts

    def training(
        self,
        base_dir: str,
        *,
        label_names: tuple[str, ...],
        max_length: int,
        options: Mapping[str, Any] | None = None,
    ) -> ObjectDetectionTrainable:
        """`models.registry.FineTunable`. `label_names` (train.label_names) name the category ids in id order;
        empty: the base model's labels are kept."""
        opts = self.parse_training_options(options or {}, key="train.options")
        return ObjectDetectionTrainable(base_dir, label_names=label_names, options=opts)


# --- fine-tuning ------------------------------------------------------------------------------------------


def coco_annotations(objects: Any, *, image_id: int, num_labels: int) -> dict[str, Any]:
    """One image's COCO-style objects [{bbox: [x, y, w, h], category_id}, ...] → the processor's
    `annotations` entry {image_id, annotations: [{bbox, category_id, area, iscrowd}]}.

    Raises ValueError naming the object when a box or category is malformed."""
    if isinstance(objects, Mapping):  # a struct of parallel lists, as HF datasets stores `objects`
        keys = list(objects)
        objects = [dict(zip(keys, values, strict=True)) for values in zip(*objects.values(), strict=True)]
    out = []
    for k, obj in enumerate(objects or []):
        bbox, cat = obj.get("bbox"), obj.get("category_id")
        if bbox is None or len(bbox) != 4 or any(v is None for v in bbox):
            raise ValueError(f"object {k}: bbox must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise ValueError(f"object {k}: bbox {bbox!r} has a non-positive width or height")
        if cat is None or not 0 <= int(cat) < num_labels:
            raise ValueError(f"object {k}: category_id {cat!r} is not a class id in 0..{num_labels - 1}")
        out.append({"bbox": [x, y, w, h], "category_id": int(cat), "area": w * h, "iscrowd": 0})
    return {"image_id": image_id, "annotations": out}


class ObjectDetectionTrainable:
    """Training-side view of object-detection (DETR's Hungarian-matching loss comes with the model).

    The label column holds, per image, a list of {bbox [x, y, w, h] in pixels, category_id} (COCO style;
    a struct of parallel lists as in HF datasets' `objects` also works). `encode` decodes the images with
    the inference loader and lets the image processor resize them and convert the boxes
    (`annotations=` → normalised (cx, cy, w, h) `labels`). Rows whose image does not decode are dropped
    with a warning; malformed boxes fail the step with the object named."""

    def __init__(
        self, base_dir: str, *, label_names: tuple[str, ...], options: DetectionTrainingOptions | None = None
    ) -> None:
        from transformers import AutoConfig

        self.label_names = label_names
        self.processor = load_image_processor(base_dir)
        self.options = options or DetectionTrainingOptions()
        self.num_labels = len(label_names) if label_names else AutoConfig.from_pretrained(base_dir).num_labels

    def build_model(self, weights_dir: str) -> Any:
        from transformers import AutoModelForObjectDetection

        kwargs: dict[str, Any] = {}
        if self.label_names:
            # A class head of another size starts fresh.
            kwargs = {**label_maps(self.label_names), "ignore_mismatched_sizes": True}
        return AutoModelForObjectDetection.from_pretrained(weights_dir, use_safetensors=True, **kwargs)

    def encode(self, columns: Mapping[str, list[Any]], labels: list[Any]) -> dict[str, Any]:
        """Rows → {"pixel_values": (B, C, H, W), "pixel_mask": (B, H, W), "labels": [{class_labels, boxes}]}."""
        keep, images = training_images(
            columns["image"], max_pixels=self.options.max_pixels, storage_options=self.options.storage_options
        )
        annotations = [coco_annotations(labels[i], image_id=i, num_labels=self.num_labels) for i in keep]
        enc = self.processor(images=images, annotations=annotations, return_tensors="pt")
        batch = {"pixel_values": enc["pixel_values"], "labels": list(enc["labels"])}
        if "pixel_mask" in enc:
            batch["pixel_mask"] = enc["pixel_mask"]
        # Not model inputs: each image's (height, width) and gold COCO objects, for eval_predictions.
        batch["_sizes"] = [(image.height, image.width) for image in images]
        batch["_objects"] = [a["annotations"] for a in annotations]
        return batch

    # Task metrics per epoch (pipeline.train.loop): COCO mAP@[.5:.95] picks the best epoch.
    eval_score = ("eval_map", "max")

    def eval_predictions(self, output: Any, batch: Mapping[str, Any], *, model: Any) -> list[tuple[Any, Any]]:
        """({"objects": [{label, score, box}]}, gold COCO objects) per eval image: the image processor's
        `post_process_object_detection` at the image's own size, every query kept (threshold 0: mAP ranks
        the detections by score itself)."""
        found = self.processor.post_process_object_detection(
            output, threshold=0.0, target_sizes=batch["_sizes"]
        )
        pairs = []
        for result, gold in zip(found, batch["_objects"], strict=True):
            objects = [
                {
                    "label": int(label),
                    "score": float(score),
                    "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), (float(v) for v in box), strict=True)),
                }
                for score, label, box in zip(
                    result["scores"].tolist(),
                    result["labels"].tolist(),
                    result["boxes"].tolist(),
                    strict=True,
                )
            ]
            pairs.append(({"objects": objects}, gold))
        return pairs

    def eval_metrics(self, pairs: list[tuple[Any, Any]]) -> dict[str, float]:
        return epoch_metrics(detection_metrics, pairs, {"map": "eval_map", "map_50": "eval_map_50"})

    def eval_counts(self, output: Any, batch: Mapping[str, Any]) -> tuple[float, float]:
        """(ground-truth objects found, ground-truth objects): found = the query with the highest IoU with
        the box predicts its class and that IoU >= eval_iou. Reported by pipeline.train.loop as eval_accuracy."""
        import torch
        from transformers.image_transforms import center_to_corners_format

        hits, total = 0.0, 0.0
        classes = output.logits[..., :-1].argmax(-1)  # (B, Q): best real class (last logit is "no object")
        for b, target in enumerate(batch["labels"]):
            if len(target["boxes"]) == 0:
                continue
            pred = center_to_corners_format(output.pred_boxes[b].float())  # (Q, 4) normalised corners
            true = center_to_corners_format(target["boxes"].float())  # (T, 4)
            lt = torch.max(pred[:, None, :2], true[None, :, :2])
            rb = torch.min(pred[:, None, 2:], true[None, :, 2:])
            inter = (rb - lt).clamp(min=0).prod(-1)  # (Q, T)
            area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(-1)
            area_t = (true[:, 2:] - true[:, :2]).clamp(min=0).prod(-1)
            iou = inter / (area_p[:, None] + area_t[None, :] - inter).clamp(min=1e-9)
            best_iou, best_q = iou.max(0)  # (T,)
            found = (best_iou >= self.options.eval_iou) & (classes[b][best_q] == target["class_labels"])
            hits += float(found.sum().item())
            total += float(len(target["boxes"]))
        return hits, total

    def save(self, model: Any, out_dir: str) -> None:
        """A folder that `kind: inference` (and `pipeline("object-detection")`) loads."""
        model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
