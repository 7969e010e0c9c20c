"""token-classification (NER, POS): any `AutoModelForTokenClassification` with a fast tokenizer.

Input `text`. Params follow `transformers.pipeline("token-classification")`: `aggregation_strategy`
(none | simple | first | average | max), `ignore_labels` (default ["O"]) and `stride` (texts longer than
the model are cut into windows of the model's length that overlap by `stride` tokens, and the entities of
all windows are merged, as the pipeline does; without `stride` a text is truncated to the model's length,
as the pipeline does).

Output `entities`, a list of the pipeline's dicts, with character offsets into the original text:
- `aggregation_strategy: none`: {entity, score, index, word, start, end} per token (`index` is the token's
  position in its window, as in the pipeline);
- otherwise: {entity_group, score, word, start, end} per entity.
The struct holds exactly the keys the pipeline gives for the chosen strategy (the schema is picked by
`aggregation_strategy`), so nothing is null.

Postprocessing is the pipeline's own (`TokenClassificationPipeline.postprocess`, which calls its
`gather_pre_entities`, `aggregate` and `aggregate_overlapping_entities`) run on a small stand-in for the
pipeline object, so entities, words, offsets and scores are the pipeline's by construction.

Fine-tuning (`training()`): word-level tags aligned to sub-tokens, see `TokenClassificationTrainable`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from models.classification import label_maps
from models.loading import load_pretrained
from models.metrics import tag_sequence_metrics
from models.registry import RowError, parse_params_dataclass, register_task
from models.text import (
    clip_text,
    effective_max_length,
    load_tokenizer,
    model_max_length,
    pad_token_id,
    pad_tokens,
)
from pipeline.errors import SpecError

__all__ = [
    "TokenClassification",
    "TokenClassificationParams",
    "TokenClassificationTrainable",
    "TokenClassificationTrainingOptions",
]


@dataclass(frozen=True)
class TokenClassificationParams:
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "none"
    ignore_labels: tuple[str, ...] = ("O",)
    # Overlap, in tokens, between the windows of a long text. None: one window, the text is truncated.
    stride: int | None = None


_TOKEN = pa.struct(
    [
        ("entity", pa.string()),
        ("score", pa.float64()),
        ("index", pa.int64()),
        ("word", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
    ]
)
_GROUP = pa.struct(
    [
        ("entity_group", pa.string()),
        ("score", pa.float64()),
        ("word", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
    ]
)

# The pipeline methods that `TokenClassificationPipeline.postprocess` reaches through `self`.
_PIPELINE_METHODS = (
    "gather_pre_entities",
    "aggregate",
    "aggregate_word",
    "aggregate_words",
    "group_sub_entities",
    "get_tag",
    "group_entities",
    "aggregate_overlapping_entities",
)


def _load_fast_tokenizer(model_dir: str) -> Any:
    return load_tokenizer(model_dir, fast_for="token-classification needs a fast one for character offsets")


def _pad_windows(windows: list[list[Any]], pad: int, dtype: Any) -> np.ndarray:
    """Windows of one row → (W, T) (or (W, T, 2) for offset pairs) padded with `pad` to its longest window."""
    longest = max(len(w) for w in windows)
    tail = np.shape(windows[0][0])[:1] if windows[0] else ()
    out = np.full((len(windows), longest, *tail), pad, dtype=dtype)
    for i, w in enumerate(windows):
        if w:
            out[i, : len(w)] = w
    return out


class _Preprocessor:
    """Text → windows of token ids, with what postprocess needs (offsets, special-token mask) per token."""

    def __init__(self, model_dir: str, params: TokenClassificationParams) -> None:
        self.tokenizer = _load_fast_tokenizer(model_dir)
        self.max_length = model_max_length(model_dir, self.tokenizer)
        self.stride = params.stride
        if self.stride is not None:
            room = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False)
            if self.stride >= room:
                raise SpecError(
                    "params.stride",
                    f"must be less than {room} (the model's {self.max_length} tokens minus its special "
                    f"tokens), got {self.stride}; windows advance by that difference",
                )
        self.pad_id = pad_token_id(self.tokenizer)

    def __call__(self, columns: Mapping[str, list[Any]]) -> list[dict[str, Any] | RowError]:
        texts = columns["text"]
        out: list[dict[str, Any] | RowError] = [RowError("", "")] * len(texts)
        ok_rows = []
        for i, value in enumerate(texts):
            if value is None:
                out[i] = RowError("InvalidInput", "input 'text' is null; expected a string")
            elif not isinstance(value, str):
                out[i] = RowError(
                    "InvalidInput", f"input 'text' is a {type(value).__name__}; expected a string"
                )
            else:
                ok_rows.append(i)
        if not ok_rows:
            return out
        # The pipeline's tokenizer call, batched. Windows are padded per row below, not across the batch.
        # Without windows the text is truncated: tokenize only what the kept tokens come from. Offsets of a
        # prefix are the offsets in the whole text. With `stride` every window is used, so the whole text is.
        enc = self.tokenizer(
            [texts[i] if self.stride is not None else clip_text(texts[i], self.max_length) for i in ok_rows],
            truncation=True,
            max_length=self.max_length,
            return_special_tokens_mask=True,
            return_offsets_mapping=True,
            **({"return_overflowing_tokens": True, "stride": self.stride} if self.stride is not None else {}),
        )
        sample = enc.get("overflow_to_sample_mapping") or list(range(len(ok_rows)))
        windows: list[list[int]] = [[] for _ in ok_rows]
        for w, s in enumerate(sample):
            windows[s].append(w)
        has_types = "token_type_ids" in enc
        for j, i in enumerate(ok_rows):
            ws = windows[j]
            row = {
                "input_ids": _pad_windows([enc["input_ids"][w] for w in ws], self.pad_id, np.int32),
                "attention_mask": _pad_windows([enc["attention_mask"][w] for w in ws], 0, np.int8),
                # Padding counts as special, as it does in the pipeline's padded windows: never an entity.
                "special_tokens_mask": _pad_windows([enc["special_tokens_mask"][w] for w in ws], 1, np.int8),
                "offset_mapping": _pad_windows([enc["offset_mapping"][w] for w in ws], 0, np.int32),
            }
            if has_types:
                row["token_type_ids"] = _pad_windows([enc["token_type_ids"][w] for w in ws], 0, np.int8)
            out[i] = row
        return out


class _Runner:
    """All windows of all rows of a micro-batch in one padded forward; logits back per row, (W, T, labels)."""

    def __init__(self, model_dir: str, *, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForTokenClassification

        self.torch = torch
        self.device = torch.device(device)
        self.model = load_pretrained(AutoModelForTokenClassification, model_dir, device=device, dtype=dtype)
        self.pad_id = pad_token_id(_load_fast_tokenizer(model_dir))

    def length(self, features: Mapping[str, Any]) -> int:
        return int(features["input_ids"].size)  # windows × tokens: the work and memory of this row

    def forward(self, batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        torch = self.torch
        counts = [f["input_ids"].shape[0] for f in batch]
        padded = pad_tokens(batch, pad_id=self.pad_id, token_types="token_type_ids" in batch[0])  # (sum W, T)
        inputs = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in padded.items()}
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float().cpu().numpy()  # (sum W, T, num_labels)
        out, r = [], 0
        for f, w in zip(batch, counts, strict=True):
            out.append({"logits": logits[r : r + w, : f["input_ids"].shape[1]]})
            r += w
        return out


class _Postprocessor:
    def __init__(self, model_dir: str, params: TokenClassificationParams) -> None:
        from transformers import AutoConfig
        from transformers.pipelines.token_classification import (
            AggregationStrategy,
            TokenClassificationPipeline,
        )

        # `postprocess` reads `self.tokenizer`, `self.model.config` and calls the pipeline's own helpers
        # through `self`: a stand-in with exactly those keeps parity by construction, without a pipeline.
        shim_type = type(
            "_TokenClassificationShim",
            (),
            {name: getattr(TokenClassificationPipeline, name) for name in _PIPELINE_METHODS},
        )
        self._pipe = shim_type()
        self._pipe.tokenizer = _load_fast_tokenizer(model_dir)
        self._pipe.model = SimpleNamespace(config=AutoConfig.from_pretrained(model_dir))
        self._postprocess = TokenClassificationPipeline.postprocess
        self.strategy = AggregationStrategy[params.aggregation_strategy.upper()]
        self.ignore_labels = list(params.ignore_labels)
        self.grouped = params.aggregation_strategy != "none"

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]:
        import torch

        logits = output["logits"]  # (W, T, num_labels)
        windows = [
            {
                "logits": torch.from_numpy(np.array(logits[w], dtype=np.float32))[None],  # (1, T, L)
                "sentence": inputs["text"],
                "input_ids": features["input_ids"][w][None],
                "offset_mapping": features["offset_mapping"][w][None],
                "special_tokens_mask": torch.from_numpy(np.array(features["special_tokens_mask"][w]))[None],
                "word_ids": None,
                "word_to_chars_map": None,
            }
            for w in range(logits.shape[0])
        ]
        with warnings.catch_warnings():
            # Tokenizers without word boundaries (BPE without a subword prefix) make the pipeline warn once
            # per token; the fallback it announces is the pipeline's behaviour, which we keep.
            warnings.filterwarnings("ignore", message="Tokenizer does not support real words")
            entities = self._postprocess(
                self._pipe, windows, aggregation_strategy=self.strategy, ignore_labels=self.ignore_labels
            )
        return {"entities": [self._row(e) for e in entities]}

    def _row(self, e: Mapping[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"entity_group": e["entity_group"]} if self.grouped else {"entity": e["entity"]}
        row["score"] = float(e["score"])
        if not self.grouped:
            row["index"] = int(e["index"])
        row["word"] = e["word"]
        row["start"] = None if e["start"] is None else int(e["start"])
        row["end"] = None if e["end"] is None else int(e["end"])
        return row


@register_task("token-classification")
class TokenClassification:
    name = "token-classification"
    inputs = {"text": True}
    description = "Token classification (NER, POS): entities with labels, scores and character offsets."
    postprocess_inputs = ("text",)
    postprocess_features = ("input_ids", "offset_mapping", "special_tokens_mask")
    # Fine-tuning: the label column holds one tag per word (see TokenClassificationTrainable). `text` may be
    # a list of words, so the generic "inputs are non-null strings" check does not apply; encode checks it.
    training_labels = "class_sequence"
    training_text_inputs: tuple[str, ...] = ()

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> TokenClassificationParams:
        p = parse_params_dataclass(TokenClassificationParams, params, key=key)
        if p.stride is not None:
            if p.stride < 0:
                raise SpecError(f"{key}.stride", f"must be >= 0 or null (no windows), got {p.stride}")
            if p.aggregation_strategy == "none":
                # As in the pipeline: windows overlap, and only grouped entities can be merged across them.
                raise SpecError(
                    f"{key}.stride",
                    "needs an aggregation_strategy other than 'none' (overlapping windows are merged entity "
                    "by entity); set params.aggregation_strategy to simple, first, average or max",
                )
        return p

    def output_schema(self, params: TokenClassificationParams) -> pa.Schema:
        item = _TOKEN if params.aggregation_strategy == "none" else _GROUP
        return pa.schema([("entities", pa.list_(item))])

    def load_preprocessor(self, model_dir: str, params: TokenClassificationParams) -> _Preprocessor:
        return _Preprocessor(model_dir, params)

    def load_runner(
        self, model_dir: str, params: TokenClassificationParams, *, device: str, dtype: str
    ) -> _Runner:
        return _Runner(model_dir, device=device, dtype=dtype)

    def load_postprocessor(self, model_dir: str, params: TokenClassificationParams) -> _Postprocessor:
        return _Postprocessor(model_dir, params)

    def parse_training_options(
        self, options: Mapping[str, Any], *, key: str
    ) -> TokenClassificationTrainingOptions:
        return parse_params_dataclass(TokenClassificationTrainingOptions, options, key=key)

    def training(
        self,
        base_dir: str,
        *,
        label_names: tuple[str, ...],
        max_length: int,
        options: Mapping[str, Any] | None = None,
    ) -> TokenClassificationTrainable:
        """`models.registry.FineTunable`."""
        opts = self.parse_training_options(options or {}, key="train.options")
        return TokenClassificationTrainable(
            base_dir, label_names=label_names, max_length=max_length, options=opts
        )


# --- fine-tuning ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenClassificationTrainingOptions:
    # False: only the first sub-token of a word carries its tag, the others are ignored (-100) by the loss,
    # which matches the pipeline's `first` aggregation. True: every sub-token carries the word's tag, with
    # B-X turned into I-X after the first sub-token when I-X is a label.
    label_all_tokens: bool = False


class TokenClassificationTrainable:
    """Training-side view of token-classification; built inside each Ray Train worker.

    Rows: `text` is either a list of words (a pre-split column such as CoNLL's `tokens`) or a string, split
    on whitespace into words; the label column holds one tag per word (names, or ids into label_names —
    `pipeline.train.labels` turns them into ids). Words are tokenized with `is_split_into_words=True`, so sub-tokens
    map back to their word; `[CLS]`, `[SEP]` and padding get -100. Rows longer than `max_length` tokens
    are truncated (the words past it are not trained on).
    """

    def __init__(
        self,
        base_dir: str,
        *,
        label_names: tuple[str, ...],
        max_length: int,
        options: TokenClassificationTrainingOptions,
    ) -> None:
        from transformers import AutoConfig

        self.label_names = tuple(label_names)
        self.tokenizer = _load_fast_tokenizer(base_dir)
        self.max_length = effective_max_length(
            self.tokenizer, AutoConfig.from_pretrained(base_dir), max_length
        )
        self.options = options
        index = {name: i for i, name in enumerate(self.label_names)}
        # B-X → I-X for the later sub-tokens of a word under label_all_tokens (when I-X exists).
        self._inside = [
            index.get("I-" + name[2:], i) if name.startswith("B-") else i
            for i, name in enumerate(self.label_names)
        ]

    def build_model(self, weights_dir: str) -> Any:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            weights_dir,
            **label_maps(self.label_names),
            # An encoder without a head (MiniLM) or a head of another size gets a fresh head.
            ignore_mismatched_sizes=True,
            use_safetensors=True,
        )

    def encode(self, columns: Mapping[str, list[Any]], labels: list[Any]) -> dict[str, Any]:
        import torch

        words = [_words(value, row) for row, value in enumerate(columns["text"])]
        for w, tags in zip(words, labels, strict=True):
            if tags is None or len(tags) != len(w):
                n = "no" if tags is None else len(tags)
                raise ValueError(
                    f"a training row has {len(w)} words but {n} tags (words: {w[:8]}...); the label column "
                    "needs one tag per word of `text` (a list of words, or whitespace-separated words)"
                )
        enc = self.tokenizer(
            words,
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        target = np.full(enc["input_ids"].shape, -100, dtype=np.int64)  # (B, T)
        first = np.zeros(enc["input_ids"].shape, dtype=bool)  # (B, T): a word's first sub-token
        for row, tags in enumerate(labels):
            previous = None
            for t, word in enumerate(enc.word_ids(row)):
                if word is None:
                    continue
                if word != previous:
                    target[row, t] = int(tags[word])
                    first[row, t] = True
                elif self.options.label_all_tokens:
                    target[row, t] = self._inside[int(tags[word])]
                previous = word
        batch = dict(enc)
        batch["labels"] = torch.from_numpy(target)
        batch["_first"] = first  # not a model input: eval_predictions scores words, not sub-tokens
        return batch

    # Task metrics per epoch (pipeline.train.loop): seqeval entity F1 over the words' tags picks the best epoch.
    eval_score = ("eval_entity_f1", "max")

    def eval_predictions(self, output: Any, batch: Mapping[str, Any], *, model: Any) -> list[tuple[Any, Any]]:
        """(predicted tags, true tags) per eval row, one tag name per word (of the words within max_length):
        the argmax at each word's first sub-token, as the pipeline's `first` aggregation reads it."""
        names = self.label_names
        predicted, labels = output.logits.argmax(-1).cpu().numpy(), batch["labels"].cpu().numpy()  # (B, T)
        return [
            ([names[t] for t in pred[first]], [names[t] for t in ref[first]])
            for pred, ref, first in zip(predicted, labels, batch["_first"], strict=True)
        ]

    def eval_metrics(self, pairs: list[tuple[Any, Any]]) -> dict[str, float]:
        m = tag_sequence_metrics([p for p, _ in pairs], [r for _, r in pairs])
        return {f"eval_entity_{k}": m[k] for k in ("precision", "recall", "f1")}

    def save(self, model: Any, out_dir: str) -> None:
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)


def _words(value: Any, row: int) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list | tuple) and all(isinstance(w, str) for w in value):
        return list(value)
    raise ValueError(
        f"training row {row} of the batch has `text` of type {type(value).__name__}; it must be a string "
        "(whitespace-separated words) or a list of strings (the words)"
    )
