"""What the three classifiers (text, image, audio) share: the `top_k` and `function_to_apply` params, the
output schema, and the row built from the pipeline's own postprocess.

`top_k` 1 gives label/score; k > 1 or null (all labels) also gives `scores`, best first. Each task keeps its
params dataclass (its other fields), its pipeline's postprocess call and how that pipeline spells "all".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from models.metrics import classification_metrics, epoch_metrics
from pipeline.errors import SpecError

__all__ = [
    "SCORE",
    "ClassifierTrainable",
    "FunctionToApply",
    "LabelPostprocessor",
    "check_top_k",
    "function_name",
    "label_maps",
    "label_row",
    "logits_row",
    "output_schema",
]

# transformers' ClassificationFunction values, plus "default" (the model config's choice).
FunctionToApply = Literal["default", "sigmoid", "softmax", "none"]

SCORE = pa.struct([("label", pa.string()), ("score", pa.float64())])


def check_top_k(top_k: int | None, *, key: str) -> None:
    if top_k is not None and top_k < 1:
        raise SpecError(f"{key}.top_k", f"must be >= 1 or null (all labels), got {top_k}")


def output_schema(top_k: int | None) -> pa.Schema:
    fields = [("label", pa.string()), ("score", pa.float64())]
    if top_k != 1:
        fields.append(("scores", pa.list_(SCORE)))
    return pa.schema(fields)


def function_name(value: FunctionToApply) -> str | None:
    """The pipelines' `function_to_apply` argument: None lets the model config choose."""
    return None if value == "default" else value


def logits_row(output: Mapping[str, Any]) -> Any:
    """A row's logits as the (1, num_labels) float32 tensor the pipelines' postprocess takes."""
    import torch

    return torch.from_numpy(np.array(output["logits"], dtype=np.float32))[None]


def label_row(scores: Sequence[Mapping[str, Any]], top_k: int | None) -> dict[str, Any]:
    """The output row from the pipeline's scores (best first), following `output_schema(top_k)`."""
    row: dict[str, Any] = {"label": scores[0]["label"], "score": scores[0]["score"]}
    if top_k != 1:
        row["scores"] = scores
    return row


class LabelPostprocessor:
    """The classifiers' postprocess: a row's logits → `scores(pipe, logits)` (the task's call of its pipeline's
    own postprocess, so labels and scores are the pipeline's by construction) → `label_row`.

    `pipe` stands in for the pipeline object: the pipelines' postprocess reads only `self.model.config`."""

    def __init__(self, model_dir: str, top_k: int | None, scores: Callable[[Any, Any], list[Any]]) -> None:
        from transformers import AutoConfig

        self._pipe = SimpleNamespace(model=SimpleNamespace(config=AutoConfig.from_pretrained(model_dir)))
        self.top_k = top_k
        self._scores = scores

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]:
        return label_row(self._scores(self._pipe, logits_row(output)), self.top_k)


# --- fine-tuning ------------------------------------------------------------------------------------------


def label_maps(label_names: Sequence[str]) -> dict[str, Any]:
    """`from_pretrained` keywords that size a head to the job's labels and name its outputs after them."""
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


class ClassifierTrainable:
    """The fine-tuning side that the text, image and audio classifiers share (one class per row): a head
    sized to the job's labels, macro-F1 per epoch, a folder saved with its preprocessor. A subclass names
    its `auto_class` (a transformers Auto class), sets `label_names` and `preprocessor` (the tokenizer,
    image processor or feature extractor) in `__init__`, and writes `encode`."""

    auto_class: str
    label_names: tuple[str, ...]
    preprocessor: Any

    def build_model(self, weights_dir: str) -> Any:
        """The base model (or a checkpoint of this job) with `len(label_names)` outputs named after them."""
        import transformers

        return getattr(transformers, self.auto_class).from_pretrained(
            weights_dir,
            **label_maps(self.label_names),
            # Cross-entropy over the labels, whatever the base config says (some bases are multi-label).
            problem_type="single_label_classification",
            # A base without this head (a bare encoder such as MiniLM, a CTC model) or with one of another
            # size (ImageNet's 1000 classes) gets a fresh head; a head of the same size is fine-tuned.
            ignore_mismatched_sizes=True,
            use_safetensors=True,
        )

    # Task metrics per epoch (pipeline.train.loop): macro-F1 over the eval rows picks the best epoch.
    eval_score = ("eval_macro_f1", "max")

    def eval_predictions(self, output: Any, batch: Mapping[str, Any], *, model: Any) -> list[tuple[Any, Any]]:
        """({"label": predicted class}, true class) per eval row: the argmax of the logits."""
        names = self.label_names
        predicted, true = output.logits.argmax(-1).tolist(), batch["labels"].tolist()  # (B,), (B,)
        return [({"label": names[p]}, names[t]) for p, t in zip(predicted, true, strict=True)]

    def eval_metrics(self, pairs: list[tuple[Any, Any]]) -> dict[str, float]:
        return epoch_metrics(classification_metrics, pairs, {"macro_f1": "eval_macro_f1"})

    def save(self, model: Any, out_dir: str) -> None:
        """A folder that `kind: inference` and the task's `transformers.pipeline` load: weights, config and
        the preprocessor's files."""
        model.save_pretrained(out_dir)
        self.preprocessor.save_pretrained(out_dir)
