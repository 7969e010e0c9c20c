"""What `summarization` and `translation` share: any `AutoModelForSeq2SeqLM` (BART, T5, Marian, mBART, ...)
run with `generate`, and seq2seq fine-tuning.

transformers 5 removed the `summarization` and `translation` pipelines; shardwise keeps them with their
4.x names, params and output fields (`summary_text`, `translation_text`), rebuilt here on the model, its
tokenizer and `generate`, following the 4.x `Text2TextGenerationPipeline` step by step:

- prefix: the task's entry of `config.task_specific_params` (T5: "summarize: ", "translate English to
  German: ", ...), else `config.prefix`, is prepended to every text. Translation picks the entry
  `translation_<src_lang>_to_<tgt_lang>`, or without languages the first `translation_*` one (as 4.x did
  for the bare "translation" task).
- generation params: `num_beams`, `max_new_tokens`, `min_length`, `length_penalty`,
  `no_repeat_ngram_size`, `early_stopping`; a param left null takes the task's `task_specific_params`
  entry, else the model's `generation_config.json`, else the pipeline default (max_new_tokens 256 unless a
  max_length is set, num_beams 4); what is still unset is `generate`'s own default.
- mBART / M2M100 / NLLB tokenizers (those with `_build_translation_inputs`): `src_lang` selects the source
  language code the tokenizer adds, `tgt_lang` becomes `forced_bos_token_id` for the decoder.
- output: `tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`, the 4.x
  postprocess.

Inputs longer than the model takes are truncated to its limit (`truncation: true`, the default; the 4.x
pipeline did not truncate and failed) or, with `truncation: false`, become error records. A null or
non-string text is an error record.

Fine-tuning (`training_labels = "raw"`): `train.label_column` holds the target text of each row. `encode`
tokenizes the source (with the same prefix as inference) and the target (`text_target=`, so mBART-style
tokenizers switch to target mode), pads both, and sets the label padding to -100 so the loss skips it;
the model builds `decoder_input_ids` from the labels itself. Options (`train.options`):
`max_target_length` (default: `train.max_length`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.loading import load_pretrained
from models.metrics import epoch_metrics, rouge_metrics, translation_metrics
from models.registry import RowError, parse_params_dataclass
from models.text import clip_text, effective_max_length, pad_token_id, pad_tokens
from models.text import load_tokenizer as _load_tokenizer  # the name the training code uses
from pipeline.errors import SpecError

__all__ = [
    "Seq2SeqParams",
    "Seq2SeqTrainable",
    "TranslationParams",
    "load_postprocessor",
    "load_preprocessor",
    "load_runner",
    "parse_training_options",
    "validate_params",
]

# The 4.x Text2TextGenerationPipeline's `_default_generation_config` (max_new_tokens=256, num_beams=4).
_PIPELINE_DEFAULTS = {"max_new_tokens": 256, "num_beams": 4}
_GENERATION_KEYS = (
    "num_beams",
    "max_new_tokens",
    "min_length",
    "length_penalty",
    "no_repeat_ngram_size",
    "early_stopping",
)


@dataclass(frozen=True)
class Seq2SeqParams:
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    early_stopping: bool | None = None
    # Inputs longer than the model's limit: cut to it (true) or error records (false).
    truncation: bool = True


@dataclass(frozen=True)
class TranslationParams(Seq2SeqParams):
    # Language codes as the tokenizer names them (mBART "en_XX", NLLB "eng_Latn"; T5 "en", "de" select the
    # task_specific_params entry translation_en_to_de).
    src_lang: str | None = None
    tgt_lang: str | None = None


def validate_params(p: Seq2SeqParams, *, key: str) -> None:
    checks = (
        ("num_beams", p.num_beams is None or p.num_beams >= 1, "must be >= 1"),
        ("max_new_tokens", p.max_new_tokens is None or p.max_new_tokens >= 1, "must be >= 1"),
        ("min_length", p.min_length is None or p.min_length >= 0, "must be >= 0"),
        (
            "no_repeat_ngram_size",
            p.no_repeat_ngram_size is None or p.no_repeat_ngram_size >= 0,
            "must be >= 0",
        ),
    )
    for name, ok, what in checks:
        if not ok:
            raise SpecError(f"{key}.{name}", f"{what}, got {getattr(p, name)!r}")
    if isinstance(p, TranslationParams) and (p.src_lang is None) != (p.tgt_lang is None):
        missing = "tgt_lang" if p.tgt_lang is None else "src_lang"
        raise SpecError(f"{key}.{missing}", "src_lang and tgt_lang go together; set both or neither")


# -------------------------------------------------------------------------------------------------------
# Settings: prefix and generate() kwargs, as the 4.x pipeline resolved them


@dataclass(frozen=True)
class _Settings:
    prefix: str
    generate_kwargs: dict[str, Any]
    max_input: int  # the longest input (tokens) the encoder takes
    src_lang: str | None
    tgt_lang: str | None


def _task_key(task: str, config: Any, params: Seq2SeqParams) -> str:
    if task == "summarization":
        return "summarization"
    if isinstance(params, TranslationParams) and params.src_lang and params.tgt_lang:
        return f"translation_{params.src_lang}_to_{params.tgt_lang}"
    entries = getattr(config, "task_specific_params", None) or {}
    return next((k for k in entries if k.startswith("translation")), "translation")


def _resolve(model_dir: str, task: str, params: Seq2SeqParams, tokenizer: Any) -> _Settings:
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    try:
        model_generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        model_generation = GenerationConfig.from_model_config(config)
    task_params = dict(
        (getattr(config, "task_specific_params", None) or {}).get(_task_key(task, config, params), {})
    )
    prefix = task_params.pop("prefix", None)
    if prefix is None:
        prefix = getattr(config, "prefix", None) or ""
    user = {k: getattr(params, k) for k in _GENERATION_KEYS if getattr(params, k) is not None}
    # Precedence: params > task_specific_params > the model's generation config > pipeline defaults.
    set_params = {**model_generation.to_diff_dict(), **task_params, **user}
    added = {
        k: v
        for k, v in _PIPELINE_DEFAULTS.items()
        if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)
    }
    kwargs = {**task_params, **user, **added}
    src = getattr(params, "src_lang", None)
    tgt = getattr(params, "tgt_lang", None)
    if tgt is not None and hasattr(tokenizer, "_build_translation_inputs"):
        kwargs["forced_bos_token_id"] = tokenizer.convert_tokens_to_ids(tgt)
    return _Settings(
        prefix=prefix,
        generate_kwargs=kwargs,
        max_input=effective_max_length(tokenizer, config, None),
        src_lang=src,
        tgt_lang=tgt,
    )


def _encode(tokenizer: Any, settings: _Settings, texts: list[str], *, truncation: bool) -> list[list[int]]:
    """Token ids of `prefix + text`, with the translation language codes where the tokenizer has them."""
    texts = [settings.prefix + t for t in texts]
    kwargs: dict[str, Any] = {"truncation": truncation}
    if truncation:
        kwargs["max_length"] = settings.max_input
    if hasattr(tokenizer, "_build_translation_inputs") and settings.tgt_lang is not None:
        enc = tokenizer._build_translation_inputs(
            texts, return_tensors=None, src_lang=settings.src_lang, tgt_lang=settings.tgt_lang, **kwargs
        )
    else:
        enc = tokenizer(texts, **kwargs)
    return enc["input_ids"]


# -------------------------------------------------------------------------------------------------------
# Preprocess (CPU) → replica (pad + generate) → postprocess (decode)


class _Preprocessor:
    def __init__(self, model_dir: str, task: str, params: Seq2SeqParams) -> None:
        self.tokenizer = _load_tokenizer(model_dir)
        self.settings = _resolve(model_dir, task, params, self.tokenizer)
        self.truncation = params.truncation

    def __call__(self, columns: Mapping[str, list[Any]]) -> list[dict[str, Any] | RowError]:
        values = columns["text"]
        out: list[dict[str, Any] | RowError] = [RowError("", "")] * len(values)
        ok, texts = [], []
        for i, value in enumerate(values):
            if isinstance(value, str):
                ok.append(i)
                # Truncating: only what the kept tokens come from (a 50 MB row costs milliseconds).
                texts.append(clip_text(value, self.settings.max_input) if self.truncation else value)
            else:
                what = "null" if value is None else f"a {type(value).__name__}"
                out[i] = RowError("InvalidInput", f"input 'text' is {what}; expected a string")
        if ok:
            for i, ids in zip(
                ok, _encode(self.tokenizer, self.settings, texts, truncation=self.truncation), strict=True
            ):
                if len(ids) > self.settings.max_input:
                    out[i] = RowError(
                        "InputTooLong",
                        f"{len(ids)} tokens > the model's {self.settings.max_input}; set params.truncation: true",
                    )
                else:
                    out[i] = {"input_ids": np.asarray(ids, dtype=np.int32)}
        return out


class _Runner:
    def __init__(self, model_dir: str, task: str, params: Seq2SeqParams, *, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForSeq2SeqLM

        self.torch = torch
        self.device = torch.device(device)
        self.model = load_pretrained(AutoModelForSeq2SeqLM, model_dir, device=device, dtype=dtype)
        tokenizer = _load_tokenizer(model_dir)
        self.settings = _resolve(model_dir, task, params, tokenizer)
        self.pad_id = pad_token_id(tokenizer)

    def length(self, features: Mapping[str, Any]) -> int:
        return int(features["input_ids"].shape[0])

    def forward(self, batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        torch = self.torch
        n = len(batch)
        padded = pad_tokens(batch, pad_id=self.pad_id)  # (B, T), right-padded (encoder)
        inputs = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in padded.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.settings.generate_kwargs)
        out = out.cpu().numpy().astype(np.int32)  # (B, S): decoder start token, text, EOS, padding
        results = []
        for r in range(n):
            keep = np.flatnonzero(out[r] != self.pad_id)
            end = int(keep[-1]) + 1 if keep.size else 0
            results.append({"tokens": out[r, :end]})  # trailing padding dropped (decode skips it anyway)
        return results


class _Postprocessor:
    def __init__(self, model_dir: str, field: str) -> None:
        self.tokenizer = _load_tokenizer(model_dir)
        self.field = field

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]:
        text = self.tokenizer.decode(
            output["tokens"].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return {self.field: text}


def load_preprocessor(model_dir: str, task: str, params: Seq2SeqParams) -> _Preprocessor:
    return _Preprocessor(model_dir, task, params)


def load_runner(model_dir: str, task: str, params: Seq2SeqParams, *, device: str, dtype: str) -> _Runner:
    return _Runner(model_dir, task, params, device=device, dtype=dtype)


def load_postprocessor(model_dir: str, field: str) -> _Postprocessor:
    return _Postprocessor(model_dir, field)


# -------------------------------------------------------------------------------------------------------
# Fine-tuning


@dataclass(frozen=True)
class _TrainOptions:
    # Longest target (labels) in tokens; None: train.max_length.
    max_target_length: int | None = None


def parse_training_options(options: Mapping[str, Any], *, key: str) -> _TrainOptions:
    opts = parse_params_dataclass(_TrainOptions, options, key=key)
    if opts.max_target_length is not None and opts.max_target_length < 1:
        raise SpecError(f"{key}.max_target_length", f"must be >= 1, got {opts.max_target_length}")
    return opts


class Seq2SeqTrainable:
    """Training-side view of summarization/translation (`models.registry.Trainable`): labels are target texts."""

    def __init__(
        self, base_dir: str, task: str, params: Seq2SeqParams, *, max_length: int, options: Mapping[str, Any]
    ) -> None:
        self.tokenizer = _load_tokenizer(base_dir)
        self.task = task
        self.settings = _resolve(base_dir, task, params, self.tokenizer)
        self.max_length = min(max_length, self.settings.max_input)
        opts = parse_training_options(options, key="train.options")
        self.max_target_length = opts.max_target_length or max_length

    def build_model(self, weights_dir: str) -> Any:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM.from_pretrained(weights_dir, use_safetensors=True)

    def encode(self, columns: Mapping[str, list[Any]], labels: list[Any]) -> dict[str, Any]:
        """Sources (prefixed, as at inference) and target texts → input_ids, attention_mask, labels (B, S)
        with padding = -100."""
        import torch

        bad = [i for i, t in enumerate(labels) if not isinstance(t, str)]
        if bad:
            raise ValueError(
                f"target text of {len(bad)} row(s) is not a string (e.g. {labels[bad[0]]!r}); every training "
                "row needs its target text in train.label_column"
            )
        texts = [self.settings.prefix + t for t in columns["text"]]
        if self.settings.src_lang is not None and hasattr(self.tokenizer, "src_lang"):
            self.tokenizer.src_lang = self.settings.src_lang  # mBART-style: language codes in the ids
            self.tokenizer.tgt_lang = self.settings.tgt_lang
        enc = self.tokenizer(
            texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )
        target = self.tokenizer(
            text_target=list(labels),
            truncation=True,
            max_length=self.max_target_length,
            padding=True,
            return_tensors="pt",
        )["input_ids"]  # (B, S)
        pad = self.tokenizer.pad_token_id
        enc["labels"] = torch.where(target == pad, torch.full_like(target, -100), target)
        enc.pop("token_type_ids", None)
        return {**enc, "_targets": list(labels)}  # `_targets`: not a model input, see eval_predictions

    # Task metrics per epoch (pipeline.train.loop): the record key that picks the best epoch, per task.
    _BEST = {"summarization": "eval_rougeL", "translation": "eval_bleu"}

    @property
    def eval_score(self) -> tuple[str, str]:
        return (self._BEST[self.task], "max")

    def eval_predictions(self, output: Any, batch: Mapping[str, Any], *, model: Any) -> list[tuple[Any, Any]]:
        """({field: generated text}, target text) per eval row. The text is generated here, on the eval batch:
        greedy (one beam, no sampling; the job's own generation settings are for inference) and at most
        `max_target_length` new tokens (train.options.max_target_length, else train.max_length), so an
        epoch's eval costs about that many decoder steps per batch on top of the loss forward."""
        kwargs = {k: v for k, v in self.settings.generate_kwargs.items() if k == "forced_bos_token_id"}
        tokens = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.max_target_length,
            num_beams=1,
            do_sample=False,
            **kwargs,
        )  # (B, S)
        texts = self.tokenizer.batch_decode(
            tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        field = f"{'summary' if self.task == 'summarization' else 'translation'}_text"
        return [({field: t}, ref) for t, ref in zip(texts, batch["_targets"], strict=True)]

    def eval_metrics(self, pairs: list[tuple[Any, Any]]) -> dict[str, float]:
        """ROUGE-1/2/L (rouge-score) for summarization; BLEU (sacrebleu, 0-100) and chrF for translation."""
        if self.task == "summarization":
            keys = {"rouge1": "eval_rouge1", "rouge2": "eval_rouge2", "rougeL": "eval_rougeL"}
            return epoch_metrics(rouge_metrics, pairs, keys)
        return epoch_metrics(translation_metrics, pairs, {"bleu": "eval_bleu", "chrf": "eval_chrf"})

    def save(self, model: Any, out_dir: str) -> None:
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
