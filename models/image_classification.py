"""image-classification: any `AutoModelForImageClassification` (ViT, ConvNeXT, BEiT, Swin, ResNet, timm
models through `TimmWrapperForImageClassification`, ...).

Input `image`: encoded bytes, an HF `datasets` Image struct {bytes, path}, or a path/URI (see
`models.images`). Params follow `transformers.pipeline("image-classification")`: `top_k` (1 → label/score;
k > 1 or null → also `scores`, best first; the pipeline's own default is 5, shardwise's is 1 like
text-classification) and `function_to_apply` (default | sigmoid | softmax | none); plus `max_pixels` (the
decompression-bomb cap, default PIL's 89.5 Mpx) and `storage_options` (fsspec options for path/URI inputs;
credentials from the environment are better kept out of the job spec).

CPU preprocess: decode (EXIF orientation, any mode → RGB), then the model's image processor resizes/crops
with rescale and normalize off, so pixels travel as uint8 (C, H, W); the replica rescales and normalises on
its device with the processor's factor, mean and std (`models.images`). Postprocessing is the pipeline's
own (`ImageClassificationPipeline.postprocess`), so labels and scores are the pipeline's by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from models import classification
from models.classification import FunctionToApply
from models.images import (
    DEFAULT_MAX_PIXELS,
    ImagePreprocessor,
    ShapeGroupedRunner,
    check_max_pixels,
    load_image_processor,
    training_images,
)
from models.registry import parse_params_dataclass, register_task

__all__ = [
    "ImageClassification",
    "ImageClassificationParams",
    "ImageClassificationTrainable",
    "ImageTrainingOptions",
]


@dataclass(frozen=True)
class ImageClassificationParams:
    top_k: int | None = 1
    function_to_apply: FunctionToApply = "default"
    # Images with more pixels than this become error records before any pixel is decoded.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # fsspec options for inputs given as URIs (e.g. {"endpoint_url": ...} for S3).
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageTrainingOptions:
    """`train.options` of an image-classification fine-tune."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: dict[str, Any] = field(default_factory=dict)


@register_task("image-classification")
class ImageClassification:
    name = "image-classification"
    inputs = {"image": True}
    description = "Image classification (ViT, ConvNeXT, timm): label + score per image."
    postprocess_inputs = ()
    postprocess_features = ()
    # Fine-tuning (pipeline.train): one class per row; the image column is not text.
    training_labels = "class"
    training_text_inputs: tuple[str, ...] = ()

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> ImageClassificationParams:
        p = parse_params_dataclass(ImageClassificationParams, params, key=key)
        classification.check_top_k(p.top_k, key=key)
        check_max_pixels(p.max_pixels, key=f"{key}.max_pixels")
        return p

    def output_schema(self, params: ImageClassificationParams) -> pa.Schema:
        return classification.output_schema(params.top_k)

    def load_preprocessor(self, model_dir: str, params: ImageClassificationParams) -> ImagePreprocessor:
        return ImagePreprocessor(model_dir, params, orig_size=False)

    def load_runner(
        self, model_dir: str, params: ImageClassificationParams, *, device: str, dtype: str
    ) -> ShapeGroupedRunner:
        from transformers import AutoModelForImageClassification

        return ShapeGroupedRunner.load(
            AutoModelForImageClassification, model_dir, fields=("logits",), device=device, dtype=dtype
        )

    def load_postprocessor(
        self, model_dir: str, params: ImageClassificationParams
    ) -> classification.LabelPostprocessor:
        from transformers.pipelines.image_classification import (
            ClassificationFunction,
            ImageClassificationPipeline,
        )

        function = classification.function_name(params.function_to_apply)
        function_enum = None if function is None else ClassificationFunction(function)

        def scores(pipe: Any, logits: Any) -> list[Any]:
            # The pipeline has no "all labels" value for top_k (None means its default, 5): all = num_labels.
            k = params.top_k if params.top_k is not None else pipe.model.config.num_labels
            return ImageClassificationPipeline.postprocess(
                pipe, {"logits": logits}, function_to_apply=function_enum, top_k=k
            )

        return classification.LabelPostprocessor(model_dir, params.top_k, scores)

    def parse_training_options(self, options: Mapping[str, Any], *, key: str) -> ImageTrainingOptions:
        opts = parse_params_dataclass(ImageTrainingOptions, options, key=key)
        check_max_pixels(opts.max_pixels, key=f"{key}.max_pixels")
        return opts

    def training(
        self,
        base_dir: str,
        *,
        label_names: tuple[str, ...],
        max_length: int,
        options: Mapping[str, Any] | None = None,
    ) -> ImageClassificationTrainable:
        """`models.registry.FineTunable` (`max_length` is a text setting: images ignore it)."""
        opts = self.parse_training_options(options or {}, key="train.options")
        return ImageClassificationTrainable(base_dir, label_names=label_names, options=opts)


# --- fine-tuning ------------------------------------------------------------------------------------------


class ImageClassificationTrainable(classification.ClassifierTrainable):
    """Training-side view of image-classification; built inside each Ray Train worker.

    `encode` decodes the batch's images with the same loader as inference and runs the image processor
    (float output, rescaled and normalised: training batches stay on the worker). A row whose image does
    not decode is dropped from its batch with a warning; a batch with no decodable image is an error."""

    auto_class = "AutoModelForImageClassification"

    def __init__(
        self, base_dir: str, *, label_names: tuple[str, ...], options: ImageTrainingOptions | None = None
    ) -> None:
        self.label_names = label_names
        self.processor = self.preprocessor = load_image_processor(base_dir)
        self.options = options or ImageTrainingOptions()

    def encode(self, columns: Mapping[str, list[Any]], labels: list[int]) -> dict[str, Any]:
        """Rows → {"pixel_values": (B, C, H, W) float, "labels": (B,)} for `model(**batch)`."""
        import torch

        keep, images = training_images(
            columns["image"], max_pixels=self.options.max_pixels, storage_options=self.options.storage_options
        )
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {
            "pixel_values": pixels,
            "labels": torch.as_tensor([labels[i] for i in keep], dtype=torch.long),
        }
