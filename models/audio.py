"""Audio input shared by the audio tasks: decode, downmix and resample on the CPU; batch by duration.

An `audio` input value is one of
- encoded bytes: WAV, FLAC, OGG/Vorbis, MP3 (anything libsndfile reads; MP3 needs libsndfile >= 1.1),
- an HF `datasets` Audio struct: `{"bytes", "path"}` as stored in Parquet/Arrow (bytes win; else the path
  is read), or the decoded form `{"array", "sampling_rate"}` (also `"raw"`, as `transformers` pipelines
  accept); a 2-d array is (channels, samples), the pipelines' convention,
- a str path or fsspec URI (`s3://bucket/clip.flac`, `file:///...`), read with `storage_options`.
  Relative paths resolve against the worker's working directory: give absolute paths or URIs.

`load_audio` turns a value into mono float32 samples at the model's rate: soundfile decodes, channels are
averaged (the pipelines' downmix), soxr resamples (its default "HQ" quality) when the rates differ. The
length is checked from the header before any sample is decoded. Everything that cannot become audio is a
`RowError` that says why and how to fix it: null or wrong type, empty data, missing file, undecodable or
corrupt data, no samples, non-finite samples, a bad sampling rate, an ambiguous channel layout, audio
longer than `max_duration_s` (configurable, default 600 s) or shorter than the model's receptive field.

Batching (replica side). Features travel per row as `x` (n_chunks, ...) float32 — one chunk for a
whole clip, several when a long clip is chunked — plus, for 1-d waveforms, `lengths` (n_chunks,) int32.
`forward_groups` puts the chunks of a micro-batch into forwards:
- 1-d waveforms of a model that takes an attention mask (its feature extractor returns one, e.g. Wav2Vec2
  "lv60"/`feat_extract_norm="layer"`) are zero-padded to the longest chunk of the forward with a mask:
  the outputs are the unbatched ones, so length-sorted micro-batches cost only a little padding;
- others (group-norm Wav2Vec2 "base", which was trained without masks and whose first GroupNorm and
  self-attention see any padding) are batched only with chunks of the same length, unless the task's
  `batching: pad` asks for the padded batches `pipeline(batch_size=N)` builds (faster; outputs differ a
  little from the unbatched ones);
- n-d features (log-mel frames of Whisper, AST spectrograms) batch with chunks of the same shape.
"""

from __future__ import annotations

import io
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.registry import RowError
from pipeline.errors import SpecError

__all__ = [
    "DEFAULT_MAX_DURATION_S",
    "check_max_duration",
    "chunk_items",
    "forward_groups",
    "load_audio",
    "load_audios",
    "load_for_model",
    "load_for_training",
    "training_features",
    "min_input_samples",
    "pack_chunks",
    "stack_chunks",
]

# Ten minutes: far above a speech clip, and 38 MB of float32 at 16 kHz, so one row cannot exhaust a worker.
# Longer recordings are fine for chunked ASR: raise the cap (params.max_duration_s) and set chunk_length_s.
DEFAULT_MAX_DURATION_S = 600.0


def check_max_duration(value: float | None, *, key: str) -> None:
    """Driver-side validation of a task's `max_duration_s` param."""
    if value is not None and not value > 0:
        raise SpecError(key, f"must be a positive number of seconds or null (no cap), got {value!r}")


def min_input_samples(config: Any) -> int:
    """Shortest waveform a convolutional front end (Wav2Vec2, HuBERT, WavLM, ...) turns into at least one
    frame: its receptive field (400 samples = 25 ms for wav2vec2-base). 1 for models without one."""
    kernels = getattr(config, "conv_kernel", None)
    strides = getattr(config, "conv_stride", None)
    if not kernels or not strides:
        return 1
    need = 1
    for kernel, stride in reversed(list(zip(kernels, strides, strict=True))):
        need = (need - 1) * stride + kernel
    return need


# --- decoding ---------------------------------------------------------------------------------------------


def _open_path(path: str, storage_options: Mapping[str, Any] | None) -> str | bytes | RowError:
    """A local path soundfile opens itself (it seeks to the header only), or a remote object's bytes."""
    if not path:
        return RowError("InvalidInput", "the audio path is an empty string; give a file path or URI")
    if "://" not in path or path.startswith("file://"):
        local = os.path.expanduser(path[len("file://") :] if path.startswith("file://") else path)
        if not os.path.exists(local):
            return RowError(
                "AudioNotFound",
                f"no file at {path!r}; check the path (absolute paths or URIs work everywhere)",
            )
        if os.path.isdir(local):
            return RowError("AudioNotFound", f"{path!r} is a directory, not an audio file")
        return local
    try:
        import fsspec

        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        return RowError("AudioNotFound", f"no object at {path!r}; check the URI (and params.storage_options)")
    except Exception as e:  # noqa: BLE001 - any backend error (protocol, permission, network) is this row's
        return RowError("AudioReadError", f"cannot read {path!r}: {type(e).__name__}: {e}")


def _decode_file(
    source: str | bytes, *, where: str, max_duration_s: float | None
) -> tuple[np.ndarray, int] | RowError:
    """soundfile decode → (samples (frames, channels) float32, rate), the duration checked first."""
    import soundfile as sf

    if isinstance(source, bytes) and not source:
        return RowError("EmptyAudio", f"{where} are empty (0 bytes); the file or column holds no audio")
    try:
        with sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source) as f:
            rate, frames = int(f.samplerate), int(f.frames)
            if rate <= 0:
                return RowError("AudioDecodeError", f"{where} declare a sampling rate of {rate} Hz")
            if max_duration_s is not None and frames > max_duration_s * rate:
                return _too_long(frames / rate, max_duration_s, where)
            samples = f.read(dtype="float32", always_2d=True)  # (frames, channels)
    except sf.LibsndfileError as e:
        head = source[:12] if isinstance(source, bytes) else b""
        detail = f" (first bytes {head!r})" if head else ""
        reason = getattr(e, "error_string", None) or str(e)  # without soundfile's "Error opening <obj>: "
        return RowError(
            "AudioDecodeError",
            f"{where} could not be decoded: {reason}{detail}; give WAV, FLAC, OGG or MP3 data, or a "
            "{array, sampling_rate} struct",
        )
    except Exception as e:  # noqa: BLE001 - corrupt data raises many types (RuntimeError, ValueError, ...)
        return RowError("AudioDecodeError", f"{where} could not be decoded: {type(e).__name__}: {e}")
    return samples, rate


def _too_long(seconds: float, cap: float, where: str) -> RowError:
    return RowError(
        "AudioTooLong",
        f"{where} last {seconds:.1f} s > max_duration_s {cap:g} s; raise params.max_duration_s (with "
        "chunk_length_s for speech recognition) or split the recording",
    )


def _from_array(value: Mapping[str, Any], array: Any, *, max_duration_s: float | None) -> Any:
    """A decoded `{array|raw, sampling_rate}` struct → ((samples, channels) float32, rate) or RowError."""
    rate = value.get("sampling_rate")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not rate > 0 or rate != int(rate):
        return RowError(
            "InvalidInput",
            f"the audio struct's sampling_rate is {rate!r}; expected a positive integer (Hz) next to 'array'",
        )
    rate = int(rate)
    try:
        samples = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as e:
        return RowError("InvalidInput", f"the audio struct's array is not numeric: {e}")
    if samples.ndim == 2:
        # The pipelines' convention (and torchcodec's): (channels, samples). Reuse their check, which
        # refuses the ambiguous layouts instead of averaging the wrong axis.
        from transformers.pipelines.automatic_speech_recognition import _to_mono

        try:
            samples = _to_mono(samples)
        except ValueError as e:
            return RowError("InvalidInput", f"the audio struct's array: {e}")
    elif samples.ndim != 1:
        return RowError(
            "InvalidInput",
            f"the audio struct's array has shape {samples.shape}; expected (samples,) or (channels, samples)",
        )
    if max_duration_s is not None and samples.shape[0] > max_duration_s * rate:
        return _too_long(samples.shape[0] / rate, max_duration_s, "the audio array")
    return samples[:, None], rate


def load_audio(
    value: Any,
    *,
    rate: int,
    max_duration_s: float | None = DEFAULT_MAX_DURATION_S,
    min_samples: int = 1,
    storage_options: Mapping[str, Any] | None = None,
) -> np.ndarray | RowError:
    """One input value → mono float32 samples (n,) at `rate` Hz, or a RowError saying why not."""
    if value is None:
        return RowError(
            "InvalidInput",
            "the audio is null; give encoded bytes, a {bytes, path} or {array, sampling_rate} struct, or a path",
        )
    where = "the audio bytes"
    decoded: Any = None
    if isinstance(value, Mapping):
        array = value.get("array", value.get("raw"))
        if array is not None:
            decoded = _from_array(value, array, max_duration_s=max_duration_s)
            where = "the audio array"
        else:
            data, path = value.get("bytes"), value.get("path")
            if data is None and not path:
                return RowError(
                    "InvalidInput",
                    "the audio struct has no bytes, path or array; expected {bytes, path} or "
                    "{array, sampling_rate}",
                )
            if data is not None and path:
                where = f"the audio bytes of {path!r}"
            value = data if data is not None else path
    if decoded is None:
        source: str | bytes | RowError
        if isinstance(value, str):
            where = repr(value)
            source = _open_path(value, storage_options)
            if isinstance(source, RowError):
                return source
        elif isinstance(value, (bytes, bytearray, memoryview)):
            source = bytes(value)
        else:
            return RowError(
                "InvalidInput",
                f"the audio is a {type(value).__name__}; expected encoded bytes, a {{bytes, path}} or "
                "{array, sampling_rate} struct, or a path",
            )
        decoded = _decode_file(source, where=where, max_duration_s=max_duration_s)
    if isinstance(decoded, RowError):
        return decoded
    samples, source_rate = decoded
    if samples.shape[0] == 0:
        return RowError("EmptyAudio", f"{where} hold no samples (0 frames)")
    if not np.isfinite(samples).all():
        return RowError("InvalidAudio", f"{where} hold NaN or infinite samples; the recording is corrupt")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if source_rate != rate:
        import soxr

        mono = soxr.resample(mono, source_rate, rate)
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if mono.shape[0] < min_samples:
        return RowError(
            "AudioTooShort",
            f"{where} hold {mono.shape[0]} samples at {rate} Hz ({mono.shape[0] / rate * 1000:.1f} ms); the "
            f"model needs at least {min_samples} ({min_samples / rate * 1000:.1f} ms) for one frame",
        )
    return mono


def load_audios(values: Sequence[Any], **kwargs: Any) -> list[np.ndarray | RowError]:
    """`load_audio` for every value; one bad value costs only its row."""
    return [load_audio(v, **kwargs) for v in values]


def load_for_model(
    values: Sequence[Any],
    *,
    feature_extractor: Any,
    config: Any,
    max_duration_s: float | None,
    storage_options: Mapping[str, Any] | None,
) -> list[np.ndarray | RowError]:
    """`load_audio` at the feature extractor's rate, with the model's shortest input as the floor."""
    return load_audios(
        values,
        rate=int(feature_extractor.sampling_rate),
        max_duration_s=max_duration_s,
        min_samples=min_input_samples(config),
        storage_options=storage_options,
    )


def load_for_training(values: Sequence[Any], **kwargs: Any) -> list[np.ndarray]:
    """`load_for_model` for a training batch: a bad clip stops the job with its reason (a model must not
    silently train on fewer rows than the job says), naming its position in the batch."""
    out = []
    for i, audio in enumerate(load_for_model(values, **kwargs)):
        if isinstance(audio, RowError):
            raise ValueError(
                f"a training clip (row {i} of its batch) is unusable: {audio.error_type}: {audio.message}. "
                "Fix or drop that row (an inference job over the training data lists every bad row)"
            )
        out.append(audio)
    return out


def training_features(
    values: Sequence[Any], *, feature_extractor: Any, config: Any, max_duration_s: float, storage_options: Any
) -> dict[str, Any]:
    """A training batch's clips (`load_for_training`) → the extractor's padded batch: `input_values` or
    `input_features` (B, ...) (+ `attention_mask` where the model takes one), torch tensors."""
    audios = load_for_training(
        values,
        feature_extractor=feature_extractor,
        config=config,
        max_duration_s=max_duration_s,
        storage_options=storage_options,
    )
    fe = feature_extractor
    return dict(fe(audios, sampling_rate=fe.sampling_rate, padding=True, return_tensors="pt"))


# --- features ---------------------------------------------------------------------------------------------


def pack_chunks(chunks: Sequence[Mapping[str, Any]], *, main: str) -> dict[str, np.ndarray]:
    """Feature-extractor outputs of one row's chunks (each with a batch axis of 1) → compact row features.

    1-d waveforms: `x` (n, longest) float32 zero-padded + `lengths` (n,) int32; the extractor's attention
    mask is dropped (the lengths say it). n-d features: `x` (n, ...) float32 + the extractor's
    `attention_mask`, if any, as `mask` (n, ...) int8."""
    arrays = [_numpy(c[main])[0] for c in chunks]
    if arrays[0].ndim == 1:
        lengths = np.array([a.shape[0] for a in arrays], dtype=np.int32)
        x = np.zeros((len(arrays), int(lengths.max())), dtype=np.float32)
        for i, a in enumerate(arrays):
            x[i, : a.shape[0]] = a
        return {"x": x, "lengths": lengths}
    out = {"x": np.stack(arrays).astype(np.float32, copy=False)}
    if chunks[0].get("attention_mask") is not None:
        out["mask"] = np.stack([_numpy(c["attention_mask"])[0] for c in chunks]).astype(np.int8)
    return out


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def chunk_items(batch: Sequence[Mapping[str, np.ndarray]]) -> list[tuple[int, int]]:
    """(row, chunk) pairs of a micro-batch, in row order."""
    return [(r, k) for r, f in enumerate(batch) for k in range(f["x"].shape[0])]


def _chunk_length(features: Mapping[str, np.ndarray], k: int) -> int:
    return int(features["lengths"][k]) if "lengths" in features else -1


def forward_groups(
    batch: Sequence[Mapping[str, np.ndarray]], items: Sequence[tuple[int, int]], *, pad: bool, max_items: int
) -> list[list[int]]:
    """Indices into `items` grouped into forwards (see the module docstring), longest first, each of at
    most `max_items` chunks. `pad`: 1-d chunks of different lengths may share a forward."""
    keys = []
    for r, k in items:
        f = batch[r]
        if "lengths" in f:
            keys.append((0,) if pad else (int(f["lengths"][k]),))
        else:
            keys.append(tuple(f["x"].shape[1:]))
    order = sorted(
        range(len(items)), key=lambda i: (keys[i], -_chunk_length(batch[items[i][0]], items[i][1]))
    )
    groups: list[list[int]] = []
    for i in order:
        if groups and keys[groups[-1][0]] == keys[i] and len(groups[-1]) < max_items:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def stack_chunks(
    batch: Sequence[Mapping[str, np.ndarray]], items: Sequence[tuple[int, int]], group: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One forward's inputs: x (B, longest) or (B, ...) float32; the attention mask (B, longest) int64 for
    1-d waveforms (n-d: the extractor's mask, if any); the chunk lengths (B,) for 1-d waveforms."""
    rows = [batch[items[i][0]] for i in group]
    ks = [items[i][1] for i in group]
    if "lengths" in rows[0]:
        lengths = np.array([int(f["lengths"][k]) for f, k in zip(rows, ks, strict=True)], dtype=np.int64)
        longest = int(lengths.max())
        x = np.zeros((len(rows), longest), dtype=np.float32)  # (B, T) zero padding, the extractor's value
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for j, (f, k) in enumerate(zip(rows, ks, strict=True)):
            x[j, : lengths[j]] = f["x"][k, : lengths[j]]
            mask[j, : lengths[j]] = 1
        return x, mask, lengths
    x = np.stack([f["x"][k] for f, k in zip(rows, ks, strict=True)])
    mask = (
        np.stack([f["mask"][k] for f, k in zip(rows, ks, strict=True)]).astype(np.int64)
        if "mask" in rows[0]
        else None
    )
    return x, mask, None
