"""translation: any `AutoModelForSeq2SeqLM` (Marian, T5 with its "translate English to German: " prefix,
mBART / NLLB with `src_lang` / `tgt_lang`) → `translation_text`.

The 4.x `pipeline("translation")` (removed in transformers 5), rebuilt on the model and `generate`: the
shared machinery, params and defaults are in `models.seq2seq`. Fine-tunable (`kind: finetune`): the label
column holds each row's reference translation; `stages[0].params.src_lang`/`tgt_lang` are not read there
(a fine-tune keeps the model's own languages and prefixes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from models import seq2seq
from models.registry import parse_params_dataclass, register_task

__all__ = ["Translation"]


@register_task("translation")
class Translation:
    name = "translation"
    inputs = {"text": True}
    description = "Machine translation with a seq2seq model (Marian, T5, mBART): translation_text per row."
    postprocess_inputs = ()
    postprocess_features = ()
    # Fine-tuning (pipeline.train): the label column is the target text.
    training_labels = "raw"
    training_text_inputs = ("text",)

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> seq2seq.TranslationParams:
        p = parse_params_dataclass(seq2seq.TranslationParams, params, key=key)
        seq2seq.validate_params(p, key=key)
        return p

    def output_schema(self, params: seq2seq.TranslationParams) -> pa.Schema:
        return pa.schema([("translation_text", pa.string())])

    def load_preprocessor(self, model_dir: str, params: seq2seq.TranslationParams) -> Any:
        return seq2seq.load_preprocessor(model_dir, self.name, params)

    def load_runner(
        self, model_dir: str, params: seq2seq.TranslationParams, *, device: str, dtype: str
    ) -> Any:
        return seq2seq.load_runner(model_dir, self.name, params, device=device, dtype=dtype)

    def load_postprocessor(self, model_dir: str, params: seq2seq.TranslationParams) -> Any:
        return seq2seq.load_postprocessor(model_dir, "translation_text")

    def parse_training_options(self, options: Mapping[str, Any], *, key: str) -> Any:
        return seq2seq.parse_training_options(options, key=key)

    def training(
        self, base_dir: str, *, label_names: Any, max_length: int, options: Mapping[str, Any] | None = None
    ) -> seq2seq.Seq2SeqTrainable:
        """`models.registry.FineTunable`: label_names is unused (targets are free text)."""
        return seq2seq.Seq2SeqTrainable(
            base_dir, self.name, seq2seq.TranslationParams(), max_length=max_length, options=options or {}
        )
