"""audio-classification: any `AutoModelForAudioClassification` (Wav2Vec2, HuBERT, WavLM, AST, ...).

Input `audio`: encoded bytes (WAV, FLAC, OGG, MP3), an HF `datasets` Audio struct ({bytes, path} or
{array, sampling_rate}), or a path/URI (see `models.audio`). Params follow
`transformers.pipeline("audio-classification")`: `top_k` (1 → label/score; k > 1 or null → also `scores`,
best first; the pipeline's own default is 5, shardwise's is 1 like the other classification tasks) and
`function_to_apply` (default | sigmoid | softmax | none); plus `max_duration_s` (longer clips are error
records), `batching` (exact | pad, see `models.audio`) and `storage_options` (fsspec options for URIs).

CPU preprocess: decode, downmix, resample to the feature extractor's rate (`models.audio.load_audio`),
then the pipeline's own preprocess (`AudioClassificationPipeline.preprocess`: the feature extractor on the
whole clip). The replica pads (or groups) by duration and runs the model only. Postprocessing is the
pipeline's own (`AudioClassificationPipeline.postprocess`), so labels and scores are the pipeline's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from models import classification
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
from models.classification import FunctionToApply
from models.loading import load_pretrained
from models.registry import RowError, parse_params_dataclass, register_task

__all__ = [
    "AudioClassification",
    "AudioClassificationParams",
    "AudioClassificationTrainable",
    "AudioTrainingOptions",
]


@dataclass(frozen=True)
class AudioClassificationParams:
    top_k: int | None = 1
    function_to_apply: FunctionToApply = "default"
    # Clips longer than this (seconds) become error records before they are decoded; null: no cap.
    max_duration_s: float | None = DEFAULT_MAX_DURATION_S
    # exact: outputs equal the unbatched pipeline's; pad: zero-pad mixed durations for models trained without
    # attention masks too (faster, outputs differ a little). See models.audio.
    batching: Literal["exact", "pad"] = "exact"
    # fsspec options for inputs given as URIs (e.g. {"endpoint_url": ...} for S3).
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AudioTrainingOptions:
    """`train.options` of an audio fine-tune (classification or CTC speech recognition)."""

    max_duration_s: float | None = DEFAULT_MAX_DURATION_S
    storage_options: dict[str, Any] = field(default_factory=dict)


def load_feature_extractor(model_dir: str) -> Any:
    from transformers import AutoFeatureExtractor

    return AutoFeatureExtractor.from_pretrained(model_dir)


class _Preprocessor:
    def __init__(self, model_dir: str, params: AudioClassificationParams) -> None:
        from transformers import AutoConfig
        from transformers.pipelines.audio_classification import AudioClassificationPipeline

        self.fe = load_feature_extractor(model_dir)
        self.config = AutoConfig.from_pretrained(model_dir)
        self.params = params
        self.main = self.fe.model_input_names[0]
        # The pipeline's preprocess reads only these two attributes of the pipeline.
        self._pipe = SimpleNamespace(feature_extractor=self.fe, dtype=None)
        self._preprocess = AudioClassificationPipeline.preprocess

    def __call__(self, columns: Mapping[str, list[Any]]) -> list[dict[str, Any] | RowError]:
        out: list[dict[str, Any] | RowError] = []
        audios = load_for_model(
            columns["audio"],
            feature_extractor=self.fe,
            config=self.config,
            max_duration_s=self.params.max_duration_s,
            storage_options=self.params.storage_options,
        )
        for audio in audios:
            if isinstance(audio, RowError):
                out.append(audio)
                continue
            processed = self._preprocess(self._pipe, audio)  # BatchFeature, batch axis of 1
            out.append(pack_chunks([processed], main=self.main))
        return out


class _Runner:
    def __init__(self, model_dir: str, params: AudioClassificationParams, *, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForAudioClassification

        self.torch = torch
        self.device = torch.device(device)
        self.model = load_pretrained(AutoModelForAudioClassification, model_dir, device=device, dtype=dtype)
        self.dtype = self.model.dtype
        fe = load_feature_extractor(model_dir)
        # The pipeline passes the mask exactly when the extractor returns one (models trained with masks).
        self.use_mask = bool(getattr(fe, "return_attention_mask", False))
        self.pad = self.use_mask or params.batching == "pad"

    def length(self, features: Mapping[str, Any]) -> int:
        if "lengths" in features:
            return int(features["lengths"].sum())
        return int(features["x"][0].size)

    def forward(self, batch: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        torch = self.torch
        items = chunk_items(batch)  # one chunk per row: the whole clip
        logits_out: list[np.ndarray | None] = [None] * len(batch)
        for group in forward_groups(batch, items, pad=self.pad, max_items=len(items)):
            x, mask, lengths = stack_chunks(batch, items, group)
            inputs = {self.model.main_input_name: torch.from_numpy(x).to(self.device, non_blocking=True)}
            inputs[self.model.main_input_name] = inputs[self.model.main_input_name].to(self.dtype)
            if mask is not None and (lengths is None or self.use_mask):
                inputs["attention_mask"] = torch.from_numpy(mask).to(self.device, non_blocking=True)
            with torch.inference_mode():
                logits = self.model(**inputs).logits.float().cpu().numpy()  # (B, num_labels)
            for j, i in enumerate(group):
                logits_out[items[i][0]] = logits[j]
        return [{"logits": logits} for logits in logits_out]


@register_task("audio-classification")
class AudioClassification:
    name = "audio-classification"
    inputs = {"audio": True}
    description = "Audio/speech classification (keywords, speakers, emotion, sounds): label + score per clip."
    postprocess_inputs = ()
    postprocess_features = ()
    # Fine-tuning (pipeline.train): one class per row, read from train.label_column; `audio` is not text.
    training_labels = "class"
    training_text_inputs: tuple[str, ...] = ()

    def parse_params(self, params: Mapping[str, Any], *, key: str) -> AudioClassificationParams:
        p = parse_params_dataclass(AudioClassificationParams, params, key=key)
        classification.check_top_k(p.top_k, key=key)
        check_max_duration(p.max_duration_s, key=f"{key}.max_duration_s")
        return p

    def output_schema(self, params: AudioClassificationParams) -> pa.Schema:
        return classification.output_schema(params.top_k)

    def load_preprocessor(self, model_dir: str, params: AudioClassificationParams) -> _Preprocessor:
        return _Preprocessor(model_dir, params)

    def load_runner(
        self, model_dir: str, params: AudioClassificationParams, *, device: str, dtype: str
    ) -> _Runner:
        return _Runner(model_dir, params, device=device, dtype=dtype)

    def load_postprocessor(
        self, model_dir: str, params: AudioClassificationParams
    ) -> classification.LabelPostprocessor:
        from transformers.pipelines.audio_classification import AudioClassificationPipeline

        function = classification.function_name(params.function_to_apply)

        def scores(pipe: Any, logits: Any) -> list[Any]:
            # As the pipeline's `_sanitize_parameters`: null → all labels, more than there are → all of them.
            n = pipe.model.config.num_labels
            return AudioClassificationPipeline.postprocess(
                pipe,
                SimpleNamespace(logits=logits),
                top_k=min(params.top_k or n, n),
                function_to_apply=function,
            )

        return classification.LabelPostprocessor(model_dir, params.top_k, scores)

    def parse_training_options(self, options: Mapping[str, Any], *, key: str) -> AudioTrainingOptions:
        opts = parse_params_dataclass(AudioTrainingOptions, options, key=key)
        check_max_duration(opts.max_duration_s, key=f"{key}.max_duration_s")
        return opts

    def training(
        self,
        base_dir: str,
        *,
        label_names: tuple[str, ...],
        max_length: int,
        options: Mapping[str, Any],
    ) -> AudioClassificationTrainable:
        """`models.registry.FineTunable`. `max_length` (tokens) does not apply to audio: clips are whole,
        up to `train.options.max_duration_s`."""
        return AudioClassificationTrainable(
            base_dir,
            label_names=label_names,
            options=self.parse_training_options(options, key="train.options"),
        )


# --- fine-tuning ------------------------------------------------------------------------------------------
# `models.registry.Trainable`: a head sized to the job's labels, clips decoded and featurised like inference
# (same loader, the extractor pads the batch), a standard HF folder with the feature extractor.


class AudioClassificationTrainable(classification.ClassifierTrainable):
    """Training-side view of audio-classification; built inside each Ray Train worker."""

    auto_class = "AutoModelForAudioClassification"

    def __init__(self, base_dir: str, *, label_names: tuple[str, ...], options: AudioTrainingOptions) -> None:
        from transformers import AutoConfig

        self.label_names = label_names
        self.options = options
        self.fe = self.preprocessor = load_feature_extractor(base_dir)
        self.config = AutoConfig.from_pretrained(base_dir)

    def encode(self, columns: Mapping[str, list[Any]], labels: list[int]) -> dict[str, Any]:
        """Clips → the extractor's padded batch (+ its attention mask where the model takes one)."""
        import torch

        batch = training_features(
            columns["audio"],
            feature_extractor=self.fe,
            config=self.config,
            max_duration_s=self.options.max_duration_s,
            storage_options=self.options.storage_options,
        )  # input_values (B, T) (+ attention_mask (B, T))
        batch["labels"] = torch.as_tensor(labels, dtype=torch.long)  # (B,)
        return batch
