"""automatic-speech-recognition: CTC models (`AutoModelForCTC`: Wav2Vec2, HuBERT, WavLM, ...) and
sequence-to-sequence speech models (`AutoModelForSpeechSeq2Seq`: Whisper, Speech2Text, ...).

Input `audio`: encoded bytes (WAV, FLAC, OGG, MP3), an HF `datasets` Audio struct ({bytes, path} or
{array, sampling_rate}), or a path/URI (see `models.audio`). Output `text` (+ `chunks`, a list of
{text, timestamp: [start, end]} in seconds, when `return_timestamps` is set). Params follow
`transformers.pipeline("automatic-speech-recognition")`:
- `chunk_length_s` / `stride_length_s`: long audio in overlapping chunks (stride defaults to a sixth of
  the chunk on each side), merged as the pipeline merges them;
- `return_timestamps`: "char" | "word" for CTC models; true (segments) for Whisper;
- `generate_kwargs`: passed to `generate` for seq2seq models (e.g. {num_beams: 1, max_new_tokens: 128});
  the pipeline's defaults apply where neither these nor the model's generation config say otherwise;
plus `max_duration_s` (longer clips are error records; raise it together with `chunk_length_s`),
`batching` (exact | pad, see `models.audio`), `chunk_batch_size` (chunks per forward when chunking; the
pipeline's `batch_size` counts chunks too) and `storage_options` (fsspec options for URIs).

Every step past decoding is the pipeline's own code, called on a stand-in for the pipeline object:
- CPU preprocess: `models.audio.load_audio` (decode, downmix, soxr resample to the extractor's rate), then
  `AutomaticSpeechRecognitionPipeline.preprocess` — `chunk_iter` and the feature extractor per chunk;
- replica: pads (or groups) the chunks of a micro-batch by duration and calls the pipeline's `_forward`
  (argmax of the CTC logits on the device; `generate` for seq2seq), then trims each chunk to its frames;
- CPU postprocess: `AutomaticSpeechRecognitionPipeline.postprocess` — stride trimming of CTC chunks
  (`rescale_stride`), the tokenizer's decode with char/word offsets, Whisper's `_decode_asr`, and
  `_find_longest_common_sequence` for other seq2seq chunks.
So texts are the pipeline's by construction. CTC with an n-gram LM (`pyctcdecode`) is not supported.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from models.audio import (
    DEFAULT_MAX_DURATION_S,
    check_max_duration,
    chunk_items,
    forward_groups,
    load_for_model,
    pack_chunks,
    stack_chunks,
    training_features,
)
from models.loading import load_pretrained
from models.metrics import asr_metrics, epoch_metrics
from models.registry import RowError, parse_params_dataclass, register_task
from pipeline.errors import ModelError, SpecError

__all__ = [
    "AutomaticSpeechRecognition",
    "AutomaticSpeechRecognitionParams",
    "CTCTrainable",
    "CTCTrainingOptions",
    "speech_model_type",
]


@dataclass(frozen=True)
class AutomaticSpeechRecognitionParams:
    # Seconds per chunk for long audio; null: the whole clip in one forward.
    chunk_length_s: float | None = None
    # Context on each side of a chunk (seconds; one number or [left, right]); null: chunk_length_s / 6.
    stride_length_s: float | tuple[float, float] | None = None
    return_timestamps: Literal["char", "word"] | bool | None = None
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    max_duration_s: float | None = DEFAULT_MAX_DURATION_S
    batching: Literal["exact", "pad"] = "exact"
    # Chunks per forward when chunking (a micro-batch's rows may hold many chunks each).
    chunk_batch_size: int = 16
    storage_options: dict[str, Any] = field(default_factory=dict)


_CHUNK = pa.struct([("text", pa.string()), ("timestamp", pa.list_(pa.float64()))])


def speech_model_type(config: Any) -> str:
    """The pipeline's name for how a model decodes: "ctc", "seq2seq_whisper" or "seq2seq"."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CTC_MAPPING_NAMES,
        MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    )

    if config.model_type == "whisper":
        return "seq2seq_whisper"
    if config.model_type in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES:
        return "seq2seq"
    if config.model_type in MODEL_FOR_CTC_MAPPING_NAMES:
        return "ctc"

    raise ModelError(
        f"model type {config.model_type!r} is neither a CTC model (AutoModelForCTC) nor a seq2seq speech "
        "model (AutoModelForSpeechSeq2Seq); automatic-speech-recognition supports those two kinds"
    )


def _pipeline_view(model_dir: str) -> SimpleNamespace:
    """What the pipeline's preprocess/_sanitize_parameters/postprocess read of `self`: its type, feature
    extractor, tokenizer, model config and generation config, and `_align_to` (samples per CTC frame)."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer, GenerationConfig
    from transformers.pipelines.automatic_speech_recognition import AutomaticSpeechRecognitionPipeline

    config = AutoConfig.from_pretrained(model_dir)
    kind = speech_model_type(config)
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir) if kind != "ctc" else None
    except OSError:  # no generation_config.json: the model config's defaults
        generation_config = GenerationConfig.from_model_config(config)
    view = SimpleNamespace(
        type=kind,
        feature_extractor=AutoFeatureExtractor.from_pretrained(model_dir),
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        model=SimpleNamespace(config=config, generation_config=generation_config),
        dtype=None,
    )
    view._align_to = AutomaticSpeechRecognitionPipeline._align_to.fget(view)
    return view


def _pipeline_params(params: AutomaticSpeechRecognitionParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if params.chunk_length_s:
        out["chunk_length_s"] = params.chunk_length_s
        if params.stride_length_s is not None:
            stride = params.stride_length_s
            out["stride_length_s"] = list(stride) if isinstance(stride, tuple) else stride
    if params.return_timestamps not in (None, False):
        out["return_timestamps"] = params.return_timestamps
    return out


def _sanitize(pipe: Any, params: AutomaticSpeechRecognitionParams) -> tuple[dict, dict, dict]:
    """The pipeline's own split of the params into preprocess/forward/postprocess kwargs; its ValueErrors
    (e.g. "char" timestamps asked of Whisper) become a ModelError that names the param."""
    from transformers.pipelines.automatic_speech_recognition import AutomaticSpeechRecognitionPipeline

    try:
        return AutomaticSpeechRecognitionPipeline._sanitize_parameters(
            pipe, ignore_warning=True, **_pipeline_params(params), **params.generate_kwargs
        )
    except ValueError as e:
        raise ModelError(f"params do not suit this {pipe.type} model: {e}") from e


class _Preprocessor:
    def __init__(self, model_dir: str, params: AutomaticSpeechRecognitionParams) -> None:
        from transformers.pipelines.automatic_speech_recognition import AutomaticSpeechRecognitionPipeline

        self._pipe = _pipeline_view(model_dir)
        self.preprocess_params, _, _ = _sanitize(self._pipe, params)
        self._preprocess = AutomaticSpeechRecognitionPipeline.preprocess
        self.params = params
        self.main = self._pipe.feature_extractor.model_input_names[0]

    def __call__(self, columns: Mapping[str, list[Any]]) -> list[dict[str, Any] | RowError]:
        out: list[dict[str, Any] | RowError] = []
        audios = load_for_model(
            columns["audio"],
            feature_extractor=self._pipe.feature_extractor,
            config=self._pipe.model.config,
            max_duration_s=self.params.max_duration_s,
            storage_options=self.params.storage_options,
        )
        for audio in audios:
            if isinstance(audio, RowError):
                out.append(audio)
                continue
            # chunk_iter + the feature extractor per chunk; each item has a batch axis of 1.
            items = list(self._preprocess(self._pipe, audio, **self.preprocess_params))
            row = pack_chunks(items, main=self.main)
            if "stride" in items[0]:
                row["stride"] = np.array([item["stride"] for item in items], dtype=np.int64)  # (n, 3) samples
            out.append(row)
        return out


class _Runner:
    def __init__(
        self, model_dir: str, params: AutomaticSpeechRecognitionParams, *, device: str, dtype: str
    ) -> None:
        import torch
        from transformers import (
            AutoConfig,
            AutoFeatureExtractor,
            AutomaticSpeechRecognitionPipeline,
            AutoModelForCTC,
            AutoModelForSpeechSeq2Seq,
            AutoTokenizer,
        )

        self.torch = torch
        self.device = torch.device(device)
        self.kind = speech_model_type(AutoConfig.from_pretrained(model_dir))
        auto = AutoModelForCTC if self.kind == "ctc" else AutoModelForSpeechSeq2Seq
        model = load_pretrained(auto, model_dir, device=device, dtype=dtype)
        self.model = model
        # The pipeline object only to call its `_forward` (argmax on the device for CTC; `generate` with the
        # pipeline's generation defaults for seq2seq). Inputs are collated here.
        self.pipe = AutomaticSpeechRecognitionPipeline(
            model=model,
            feature_extractor=AutoFeatureExtractor.from_pretrained(model_dir),
            tokenizer=AutoTokenizer.from_pretrained(model_dir),
            device=self.device,
        )
        _, self.forward_params, _ = _sanitize(self.pipe, params)
        fe = self.pipe.feature_extractor
        self.pad = bool(getattr(fe, "return_attention_mask", False)) or params.batching == "pad"
        self.chunked = bool(params.chunk_length_s)
        self.chunk_batch_size = params.chunk_batch_size
        self.pad_id = getattr(model.generation_config, "pad_token_id", None) if self.kind != "ctc" else None

    def length(self, features: Mapping[str, Any]) -> int:
        if "lengths" in features:
            return int(features["lengths"].sum())
        return int(features["x"].size // max(1, features["x"].shape[1]))

    def forward(self, batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        torch = self.torch
        items = chunk_items(batch)
        per_item: list[np.ndarray] = [np.zeros(0, np.int32)] * len(items)
        max_items = self.chunk_batch_size if self.chunked else len(items)
        for group in forward_groups(batch, items, pad=self.pad, max_items=max_items):
            x, mask, lengths = stack_chunks(batch, items, group)
            inputs: dict[str, Any] = {
                self.model.main_input_name: torch.from_numpy(x)
                .to(self.device, non_blocking=True)
                .to(self.model.dtype),
                "attention_mask": None
                if mask is None
                else torch.from_numpy(mask).to(self.device, non_blocking=True),
                "is_last": True,
            }
            with torch.inference_mode():
                out = self.pipe._forward(inputs, **self.forward_params)
            tokens = out["tokens"].cpu().numpy().astype(np.int32)  # (B, frames) or (B, generated)
            if lengths is not None and self.kind == "ctc":
                # The unbatched pipeline sees each chunk's own frames only: drop the padding frames.
                keep = self.model._get_feat_extract_output_lengths(torch.from_numpy(lengths)).tolist()
            else:
                keep = [_unpadded(t, self.pad_id) for t in tokens]
            for j, i in enumerate(group):
                per_item[i] = tokens[j, : int(keep[j])]
        out_rows: list[dict[str, Any]] = []
        for r in range(len(batch)):
            mine = [per_item[i] for i, (row, _) in enumerate(items) if row == r]
            out_rows.append(
                {
                    "tokens": np.concatenate(mine).astype(np.int32),
                    "counts": np.array([len(t) for t in mine], dtype=np.int32),
                }
            )
        return out_rows


def _unpadded(tokens: np.ndarray, pad_id: int | None) -> int:
    """Length of a generated sequence without the trailing pad tokens a batched `generate` adds."""
    n = len(tokens)
    if pad_id is None:
        return n
    while n > 0 and tokens[n - 1] == pad_id:
        n -= 1
    return n


class _Postprocessor:
    def __init__(self, model_dir: str, params: AutomaticSpeechRecognitionParams) -> None:
        from transformers.pipelines.automatic_speech_recognition import (
            AutomaticSpeechRecognitionPipeline,
            rescale_stride,
        )

        self._pipe = _pipeline_view(model_dir)
        _, _, self.postprocess_params = _sanitize(self._pipe, params)
        self._postprocess = AutomaticSpeechRecognitionPipeline.postprocess
        self._rescale_stride = rescale_stride
        self.with_chunks = params.return_timestamps not in (None, False)

    def __call__(
        self, output: Mapping[str, Any], *, inputs: Mapping[str, Any], features: Mapping[str, Any]
    ) -> dict[str, Any]:
        import torch

        tokens = np.asarray(output["tokens"], dtype=np.int64)
        counts = [int(c) for c in output["counts"]]
        strides = features.get("stride")
        model_outputs = []
        start = 0
        for k, n in enumerate(counts):
            item: dict[str, Any] = {
                "tokens": torch.from_numpy(tokens[start : start + n].copy())[None],  # (1, T)
                "is_last": k == len(counts) - 1,
            }
            start += n
            # What the pipeline's `_forward` attaches: CTC strides rescaled to frames, Whisper's in samples.
            if strides is not None and self._pipe.type == "ctc":
                item["stride"] = self._rescale_stride(
                    [tuple(int(v) for v in strides[k])], 1 / self._pipe._align_to
                )[0]
            elif strides is not None and self._pipe.type == "seq2seq_whisper":
                item["stride"] = tuple(int(v) for v in strides[k])
            model_outputs.append(item)
        result = self._postprocess(self._pipe, model_outputs, **self.postprocess_params)
        row: dict[str, Any] = {"text": result["text"]}
        if self.with_chunks:
            row["chunks"] = [
                {
                    "text": chunk["text"],
                    "timestamp": [None if t is None else float(t) for t in chunk["timestamp"]],
                }
                for chunk in result.get("chunks", [])
            ]
        return row


@register_task("automatic-speech-recognition")
class AutomaticSpeechRecognition:
    name = "automatic-speech-recognition"
    inputs = {"audio": True}
    description = "Speech to text (Wav2Vec2 CTC, Whisper): text (+ timestamped chunks) per clip."
    postprocess_inputs = ()
    postprocess_features = ("stride",)
    # Fine-tuning (pipeline.train): the label column holds each clip's transcript as read; `audio` is not text.
    training_labels = "raw"
    training_text_inputs: tuple[str, ...] = ()

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> AutomaticSpeechRecognitionParams:
        p = parse_params_dataclass(AutomaticSpeechRecognitionParams, params, key=key)
        check_max_duration(p.max_duration_s, key=f"{key}.max_duration_s")
        if p.chunk_length_s is not None and not p.chunk_length_s > 0:
            raise SpecError(
                f"{key}.chunk_length_s", f"must be a positive number of seconds, got {p.chunk_length_s}"
            )
        if p.stride_length_s is not None:
            if not p.chunk_length_s:
                raise SpecError(
                    f"{key}.stride_length_s", "only applies with chunk_length_s; set both or neither"
                )
            left, right = (
                p.stride_length_s if isinstance(p.stride_length_s, tuple) else (p.stride_length_s,) * 2
            )
            if left < 0 or right < 0 or left + right >= p.chunk_length_s:
                raise SpecError(
                    f"{key}.stride_length_s",
                    f"left + right ({left:g} + {right:g} s) must be non-negative and shorter than "
                    f"chunk_length_s ({p.chunk_length_s:g} s)",
                )
        if p.chunk_batch_size < 1:
            raise SpecError(f"{key}.chunk_batch_size", f"must be >= 1, got {p.chunk_batch_size}")
        return p

    def output_schema(self, params: AutomaticSpeechRecognitionParams) -> pa.Schema:
        fields = [("text", pa.string())]
        if params.return_timestamps not in (None, False):
            fields.append(("chunks", pa.list_(_CHUNK)))
        return pa.schema(fields)

    def load_preprocessor(self, model_dir: str, params: AutomaticSpeechRecognitionParams) -> _Preprocessor:
        return _Preprocessor(model_dir, params)

    def load_runner(
        self, model_dir: str, params: AutomaticSpeechRecognitionParams, *, device: str, dtype: str
    ) -> _Runner:
        return _Runner(model_dir, params, device=device, dtype=dtype)

    def load_postprocessor(self, model_dir: str, params: AutomaticSpeechRecognitionParams) -> _Postprocessor:
        return _Postprocessor(model_dir, params)

    def parse_training_options(self, options: Mapping[str, Any], *, key: str) -> CTCTrainingOptions:
        opts = parse_params_dataclass(CTCTrainingOptions, options, key=key)
        check_max_duration(opts.max_duration_s, key=f"{key}.max_duration_s")
        return opts

    def training_label_names(
        self, values: list[Any], *, options: Mapping[str, Any], key: str
    ) -> tuple[str, ...]:
        """`models.registry.FineTunable` hook (driver side, pipeline.train.labels): the CTC vocabulary, the sorted characters of the transcripts
        (after normalisation; the space becomes the word delimiter "|"). Non-string transcripts fail here,
        before Ray starts."""
        opts = self.parse_training_options(options, key="train.options")
        bad = [f"{type(v).__name__} {v!r}"[:60] for v in values if not isinstance(v, str)]
        if bad:
            raise SpecError(
                key,
                f"holds {len(bad)} transcript(s) that are not strings (e.g. {bad[:3]}); give one string per clip",
            )
        if opts.vocabulary == "base":
            return ()
        chars = sorted({c for v in values for c in normalize_transcript(v, lowercase=opts.lowercase)} - {" "})
        if not chars:
            raise SpecError(key, "every transcript is empty; a CTC model needs text to learn its characters")
        return tuple(chars)

    def training(
        self,
        base_dir: str,
        *,
        label_names: tuple[str, ...],
        max_length: int,
        options: Mapping[str, Any],
    ) -> CTCTrainable:
        """`models.registry.FineTunable`: CTC fine-tuning (Wav2Vec2 and other `AutoModelForCTC` bases).
        `label_names` is the character vocabulary (`training_label_names`, or `train.label_names`);
        `max_length` (tokens) does not apply: clips are whole, up to `train.options.max_duration_s`."""
        return CTCTrainable(
            base_dir,
            label_names=label_names,
            options=self.parse_training_options(options, key="train.options"),
        )


# --- fine-tuning (CTC) ------------------------------------------------------------------------------------
# `train.label_column` holds each clip's transcript ("raw" labels). The driver builds the vocabulary from
# the transcripts (`training_label_names`); every worker builds the same Wav2Vec2CTCTokenizer from it, the
# model gets a CTC head of that size, and the tokenizer is saved with the model, so the published folder is
# a processor + model that `pipeline("automatic-speech-recognition")` and the inference task load.

# Wav2Vec2's special tokens, in the order of the released checkpoints: <pad> is the CTC blank.
_CTC_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "|")


@dataclass(frozen=True)
class CTCTrainingOptions:
    """`train.options` of a speech-recognition fine-tune."""

    max_duration_s: float | None = DEFAULT_MAX_DURATION_S
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Lower-case the transcripts (and collapse runs of whitespace) before building the vocabulary.
    lowercase: bool = True
    # transcripts: a new vocabulary and CTC head from the job's transcripts; base: keep the base model's
    # tokenizer and head (continue training a CTC model on more data of the same alphabet).
    vocabulary: Literal["transcripts", "base"] = "transcripts"
    # Freeze the convolutional feature encoder (the usual choice when fine-tuning a pretrained Wav2Vec2).
    freeze_feature_encoder: bool = False


def normalize_transcript(text: str, *, lowercase: bool) -> str:
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def ctc_tokenizer(chars: tuple[str, ...], *, lowercase: bool) -> Any:
    """A Wav2Vec2CTCTokenizer over `_CTC_SPECIALS` + `chars` (built in a temporary folder)."""
    from transformers import Wav2Vec2CTCTokenizer

    vocab = {t: i for i, t in enumerate(_CTC_SPECIALS + tuple(c for c in chars if c not in _CTC_SPECIALS))}
    with tempfile.TemporaryDirectory(prefix="shardwise-ctc-vocab-") as tmp:
        path = Path(tmp, "vocab.json")
        path.write_text(json.dumps(vocab, ensure_ascii=False))
        return Wav2Vec2CTCTokenizer(
            str(path),
            unk_token="<unk>",
            pad_token="<pad>",
            bos_token="<s>",
            eos_token="</s>",
            word_delimiter_token="|",
            do_lower_case=False,  # transcripts are normalised here, by the job's `lowercase` option
        )


class CTCTrainable:
    """Training-side view of CTC speech recognition; built inside each Ray Train worker."""

    def __init__(self, base_dir: str, *, label_names: tuple[str, ...], options: CTCTrainingOptions) -> None:
        from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer

        self.config = AutoConfig.from_pretrained(base_dir)
        if speech_model_type(self.config) != "ctc":
            raise ModelError(
                f"fine-tuning speech recognition supports CTC models (Wav2Vec2, HuBERT, ...); {base_dir!r} is a "
                f"{self.config.model_type!r} seq2seq model, which shardwise runs for inference only"
            )
        self.options = options
        self.fe = AutoFeatureExtractor.from_pretrained(base_dir)
        if options.vocabulary == "base":
            self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        else:
            self.tokenizer = ctc_tokenizer(label_names, lowercase=options.lowercase)

    def build_model(self, weights_dir: str) -> Any:
        """The base (or a checkpoint of this job) with a CTC head over the job's vocabulary."""
        from transformers import AutoModelForCTC

        model = AutoModelForCTC.from_pretrained(
            weights_dir,
            vocab_size=len(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id,
            ctc_loss_reduction="mean",
            # A clip with more characters than frames has no CTC alignment (infinite loss): count it as 0
            # rather than let it turn every gradient into NaN.
            ctc_zero_infinity=True,
            ignore_mismatched_sizes=True,  # a new vocabulary: a new head
            use_safetensors=True,
        )
        if self.options.freeze_feature_encoder:
            model.freeze_feature_encoder()
        return model

    def encode(self, columns: Mapping[str, list[Any]], labels: list[str]) -> dict[str, Any]:
        """Clips → the extractor's padded batch; transcripts → character ids padded with -100 (ignored)."""
        import torch

        batch = training_features(
            columns["audio"],
            feature_extractor=self.fe,
            config=self.config,
            max_duration_s=self.options.max_duration_s,
            storage_options=self.options.storage_options,
        )  # input_values (B, T) (+ attention_mask (B, T) where the model takes one)
        texts = [normalize_transcript(t, lowercase=self.options.lowercase) for t in labels]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        longest = max(1, max(len(x) for x in ids))
        target = torch.full((len(ids), longest), -100, dtype=torch.long)  # (B, L)
        for i, x in enumerate(ids):
            target[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        batch["labels"] = target
        batch["_transcripts"] = texts  # not a model input: the references of eval_predictions
        return batch

    # Task metrics per epoch (pipeline.train.loop): word error rate, lower is better, picks the best epoch.
    eval_score = ("eval_wer", "min")

    def eval_predictions(self, output: Any, batch: Mapping[str, Any], *, model: Any) -> list[tuple[Any, Any]]:
        """({"text": greedy CTC transcript}, normalised target transcript) per eval row: the argmax per frame
        over the clip's frames, decoded by the tokenizer (repeats merged, blanks dropped, "|" → space)."""
        ids = output.logits.argmax(-1).cpu()  # (B, frames)
        mask = batch.get("attention_mask")
        frames = self._frames(mask.sum(-1).cpu()).tolist() if mask is not None else [ids.shape[1]] * len(ids)
        texts = self.tokenizer.batch_decode(
            [row[: int(n)].tolist() for row, n in zip(ids, frames, strict=True)]
        )
        lowercase = self.options.lowercase  # normalised as the targets are
        return [
            ({"text": normalize_transcript(t, lowercase=lowercase)}, ref)
            for t, ref in zip(texts, batch["_transcripts"], strict=True)
        ]

    def eval_metrics(self, pairs: list[tuple[Any, Any]]) -> dict[str, float]:
        return epoch_metrics(asr_metrics, pairs, {"wer": "eval_wer", "cer": "eval_cer"})

    def eval_counts(self, output: Any, batch: Mapping[str, Any]) -> tuple[float, float]:
        """(characters right, characters) of greedy CTC decoding: eval_accuracy = 1 - character error
        rate (each clip's errors capped at its length)."""
        import torch

        ids = output.logits.argmax(-1).cpu()  # (B, frames)
        mask = batch.get("attention_mask")
        frames = (
            self._frames(mask.sum(-1).cpu())
            if mask is not None
            else torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
        )
        hits = total = 0.0
        blank = self.tokenizer.pad_token_id
        for row, n, ref in zip(ids, frames.tolist(), batch["labels"].cpu(), strict=True):
            pred = torch.unique_consecutive(row[: int(n)])
            pred = pred[pred != blank].tolist()
            ref_ids = ref[ref != -100].tolist()
            hits += max(0, len(ref_ids) - _edit_distance(pred, ref_ids))
            total += len(ref_ids)
        return hits, total

    def _frames(self, lengths: Any) -> Any:
        from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2PreTrainedModel

        # The conv front end's frames for each clip (the same formula for every Wav2Vec2-style model).
        view = SimpleNamespace(config=self.config)
        return Wav2Vec2PreTrainedModel._get_feat_extract_output_lengths(view, lengths)

    def save(self, model: Any, out_dir: str) -> None:
        """Model + feature extractor + tokenizer: what `AutoProcessor`/the pipeline load."""
        model.save_pretrained(out_dir)
        self.fe.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)


def _edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two id sequences (O(len(a)·len(b)), clips are short)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]
