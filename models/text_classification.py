"""text-classification: any `AutoModelForSequenceClassification` (BERT, DistilBERT, RoBERTa, MiniLM, ...).

Inputs `text` (+ optional `text_pair`). Params follow `transformers.pipeline("text-classification")`:
`top_k` (1 → label/score; k > 1 or null → also `scores`, best first), `function_to_apply`
(default | sigmoid | softmax | none), plus `truncation`/`max_length` (the pipeline does not truncate by
default and fails on over-long input; shardwise truncates to the model's limit unless told otherwise).

Postprocessing is the pipeline's own (`TextClassificationPipeline.postprocess`), so labels and scores are
the pipeline's by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from models import classification
from models.classification import FunctionToApply
from models.loading import load_pretrained
from models.registry import RowError, parse_params_dataclass, register_task
from models.text import (
    check_text,
    clip_text,
    effective_max_length,
    load_tokenizer,
    model_max_length,
    pad_token_id,
    pad_tokens,
)

__all__ = [
    "TextClassification",
    "TextClassificationParams",
    "TextClassificationTrainable",
]


@dataclass(frozen=True)
class TextClassificationParams:
    top_k: int | None = 1
    function_to_apply: FunctionToApply = "default"
    truncation: bool = True
    # None: the tokenizer's model_max_length, capped by the model's position embeddings.
    max_length: int | None = None


class _Preprocessor:
    def __init__(self, model_dir: str, params: TextClassificationParams) -> None:
        self.tokenizer = load_tokenizer(model_dir)
        self.max_length = model_max_length(model_dir, self.tokenizer, params.max_length)
        self.truncation = params.truncation

    def __call__(self, columns: Mapping[str, list[Any]]) -> list[dict[str, Any] | RowError]:
        texts = columns["text"]
        pairs = columns.get("text_pair")
        out: list[dict[str, Any] | RowError] = [RowError("", "")] * len(texts)
        ok_rows, ok_text, ok_pair = [], [], []
        for i, value in enumerate(texts):
            text = check_text(value, "text")
            pair = check_text(pairs[i], "text_pair") if pairs is not None else None
            if isinstance(text, RowError):
                out[i] = text
            elif isinstance(pair, RowError):
                out[i] = pair
            else:
                ok_rows.append(i)
                ok_text.append(text)
                ok_pair.append(pair)
        if ok_rows:
            if self.truncation:  # only what the truncated tokens come from (a 50 MB row costs milliseconds)
                ok_text = [clip_text(t, self.max_length) for t in ok_text]
                ok_pair = [None if p is None else clip_text(p, self.max_length) for p in ok_pair]
            enc = self.tokenizer(
                ok_text,
                text_pair=ok_pair if pairs is not None else None,
                truncation=self.truncation,
                max_length=self.max_length if self.truncation else None,
            )
            has_types = "token_type_ids" in enc
            for j, i in enumerate(ok_rows):
                ids = np.asarray(enc["input_ids"][j], dtype=np.int32)
                if not self.truncation and len(ids) > self.max_length:
                    out[i] = RowError(
                        "InputTooLong",
                        f"{len(ids)} tokens > the model's {self.max_length}; set params.truncation: true",
                    )
                    continue
                row = {"input_ids": ids}
                if has_types:
                    row["token_type_ids"] = np.asarray(enc["token_type_ids"][j], dtype=np.int8)
                out[i] = row
        return out


class _Runner:
    def __init__(self, model_dir: str, *, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        self.torch = torch
        self.device = torch.device(device)
        self.model = load_pretrained(
            AutoModelForSequenceClassification, model_dir, device=device, dtype=dtype
        )
        self.pad_id = pad_token_id(load_tokenizer(model_dir))

    def length(self, features: Mapping[str, Any]) -> int:
        return int(features["input_ids"].shape[0])

    def forward(self, batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        torch = self.torch
        padded = pad_tokens(batch, pad_id=self.pad_id, token_types="token_type_ids" in batch[0])  # (B, T)
        inputs = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in padded.items()}
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float().cpu().numpy()  # (B, num_labels)
        return [{"logits": row} for row in logits]


@register_task("text-classification")
class TextClassification:
    name = "text-classification"
    inputs = {"text": True, "text_pair": False}
    description = "Sequence classification (sentiment, topics, NLI): label + score per row."
    postprocess_inputs = ()
    postprocess_features = ()

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> TextClassificationParams:
        p = parse_params_dataclass(TextClassificationParams, params, key=key)
        classification.check_top_k(p.top_k, key=key)
        return p

    def output_schema(self, params: TextClassificationParams) -> pa.Schema:
        return classification.output_schema(params.top_k)

    def load_preprocessor(self, model_dir: str, params: TextClassificationParams) -> _Preprocessor:
        return _Preprocessor(model_dir, params)

    def load_runner(
        self, model_dir: str, params: TextClassificationParams, *, device: str, dtype: str
    ) -> _Runner:
        return _Runner(model_dir, device=device, dtype=dtype)

    def load_postprocessor(
        self, model_dir: str, params: TextClassificationParams
    ) -> classification.LabelPostprocessor:
        from transformers.pipelines.text_classification import TextClassificationPipeline

        function = classification.function_name(params.function_to_apply)

        def scores(pipe: Any, logits: Any) -> list[Any]:
            return TextClassificationPipeline.postprocess(
                pipe, {"logits": logits}, function_to_apply=function, top_k=params.top_k, _legacy=False
            )

        return classification.LabelPostprocessor(model_dir, params.top_k, scores)

    def training(
        self, base_dir: str, *, label_names: tuple[str, ...], max_length: int, options: Mapping[str, Any]
    ) -> TextClassificationTrainable:
        """`models.registry.FineTunable`: tasks without this method cannot be fine-tuned."""
        return TextClassificationTrainable(base_dir, label_names=label_names, max_length=max_length)


# --- fine-tuning ------------------------------------------------------------------------------------------
# What fine-tuning needs from this task (`models.registry.Trainable`): build the model for training with a
# head sized to the job's labels, turn a batch of rows + label ids into model inputs, save a standard HF
# folder. The generic Ray Train loop lives in pipeline/train/loop.py and knows nothing about sequence classifiers.


class TextClassificationTrainable(classification.ClassifierTrainable):
    """Training-side view of text-classification; built inside each Ray Train worker."""

    auto_class = "AutoModelForSequenceClassification"

    def __init__(self, base_dir: str, *, label_names: tuple[str, ...], max_length: int) -> None:
        from transformers import AutoConfig

        self.label_names = label_names
        self.tokenizer = self.preprocessor = load_tokenizer(base_dir)
        self.max_length = effective_max_length(
            self.tokenizer, AutoConfig.from_pretrained(base_dir), max_length
        )

    def encode(self, columns: Mapping[str, list[Any]], labels: list[int]) -> dict[str, Any]:
        """Rows → padded tensors for `model(**batch)`, which then returns `.loss` and `.logits`."""
        import torch

        enc = self.tokenizer(
            columns["text"],
            text_pair=columns.get("text_pair"),
            truncation=True,
            max_length=self.max_length,
            padding=True,  # to the longest row of this batch, not max_length: short reviews stay cheap
            return_tensors="pt",
        )
        batch = dict(enc)  # input_ids, attention_mask (+ token_type_ids): (B, T)
        batch["labels"] = torch.as_tensor(labels, dtype=torch.long)  # (B,)
        return batch
