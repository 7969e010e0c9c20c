"""Builders for the audio tests: tiny random Wav2Vec2 models (classification, CTC) with a feature extractor
and a character CTC tokenizer made here, a tiny random Whisper with a locally trained byte-level BPE, and
synthetic audio encoded as WAV/FLAC/OGG bytes. Nothing is downloaded."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

RATE = 16_000
# Characters of the CTC vocabulary: lower-case letters, apostrophe; "|" is the word delimiter.
CHARS = list("abcdefghijklmnopqrstuvwxyz'")
CLASS_LABELS = ("yes", "no", "up", "down")


def ctc_vocab(chars: list[str] | None = None) -> dict[str, int]:
    """The usual Wav2Vec2 character vocabulary: <pad> (the CTC blank) first, then specials, "|", chars."""
    tokens = ["<pad>", "<s>", "</s>", "<unk>", "|"] + sorted(chars if chars is not None else CHARS)
    return {t: i for i, t in enumerate(tokens)}


def save_ctc_tokenizer(out_dir: Path, vocab: dict[str, int] | None = None) -> Any:
    from transformers import Wav2Vec2CTCTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.json"
    vocab_file.write_text(json.dumps(vocab or ctc_vocab()))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def save_feature_extractor(out_dir: Path, *, attention_mask: bool) -> Any:
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=attention_mask,
    )
    fe.save_pretrained(out_dir)
    return fe


def wav2vec2_config(*, layer_norm: bool = True, hidden: int = 32, layers: int = 2, **kw: Any) -> Any:
    """A tiny Wav2Vec2 config: 3 conv layers (stride 5·4·4 = 80 samples per frame, 5 ms at 16 kHz).

    `layer_norm=True` is the "lv60" flavour (`feat_extract_norm="layer"`, trained with attention masks, so
    padded batches give the unbatched outputs); False is the "base" flavour (group norm, no masks)."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 4, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer" if layer_norm else "group",
        do_stable_layer_norm=layer_norm,
        conv_bias=layer_norm,
        mask_time_prob=0.0,
        **kw,
    )


def make_audio_classifier(
    out_dir: Path,
    *,
    labels: tuple[str, ...] = CLASS_LABELS,
    layer_norm: bool = True,
    seed: int = 0,
    hidden: int = 32,
) -> Path:
    """A tiny random Wav2Vec2ForSequenceClassification + feature extractor, saved as safetensors."""
    import torch
    from transformers import Wav2Vec2ForSequenceClassification

    torch.manual_seed(seed)
    config = wav2vec2_config(
        layer_norm=layer_norm,
        hidden=hidden,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        classifier_proj_size=16,
    )
    model = Wav2Vec2ForSequenceClassification(config).eval()
    with torch.no_grad():  # a wider head than the default init: scores far from uniform, labels that vary
        model.classifier.weight.normal_(0.0, 1.0)
        model.projector.weight.normal_(0.0, 1.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_feature_extractor(out_dir, attention_mask=layer_norm)
    return out_dir


def make_ctc_model(
    out_dir: Path, *, layer_norm: bool = True, seed: int = 0, hidden: int = 32, layers: int = 2
) -> Path:
    """A tiny random Wav2Vec2ForCTC + feature extractor + character CTC tokenizer (a Wav2Vec2Processor)."""
    import torch
    from transformers import Wav2Vec2ForCTC

    tokenizer = save_ctc_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = wav2vec2_config(
        layer_norm=layer_norm,
        hidden=hidden,
        layers=layers,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        ctc_loss_reduction="mean",
    )
    model = Wav2Vec2ForCTC(config).eval()
    # With the default init (std 0.02) a random head puts every frame on one id; a wider head makes frames
    # differ, so the gibberish has many characters and decoding (grouping, blanks, words) is exercised.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_feature_extractor(out_dir, attention_mask=layer_norm)
    return out_dir


def make_whisper(out_dir: Path, *, seed: int = 0) -> Path:
    """A tiny random WhisperForConditionalGeneration with a byte-level BPE (trained here) that carries
    Whisper's special tokens, a feature extractor (80 mel bins, 30 s windows) and a generation config."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    words = "the quick brown fox jumps over a lazy dog hello world one two three four five".split()
    rng = np.random.default_rng(0)
    bpe.train_from_iterator([" ".join(rng.choice(words, 8)) for _ in range(500)], trainer)
    vocab = bpe.get_vocab()
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    merges = json.loads(bpe.to_str())["model"]["merges"]
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m) for m in merges) + "\n"
    )
    specials = ["<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>"]
    specials += ["<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    tokenizer = WhisperTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    # No timestamp tokens (<|0.00|> ...): this model transcribes without timestamps.
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.save_pretrained(out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        begin_suppress_tokens=[eot],
        suppress_tokens=[],
    )
    # A random decoder would often pick a special token (decoded as nothing); suppressing them makes it
    # emit text until max_length, so the parity test compares real strings.
    suppress = [i for t, i in ids.items() if t != "<|startoftranscript|>"]
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        forced_decoder_ids=None,
        begin_suppress_tokens=[eot],
        suppress_tokens=suppress,
        max_length=24,
        max_initial_timestamp_index=50,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=RATE).save_pretrained(out_dir)
    return out_dir


# --- audio ---------------------------------------------------------------------------------------------


def tone(seconds: float, *, rate: int = RATE, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A few seconds of speech-like noise: random chirps under an envelope, plus a little white noise.
    Shape (samples,) or (samples, channels), float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * rate)))
    t = np.arange(n) / rate
    f0 = rng.uniform(100, 300)
    sig = np.sin(2 * np.pi * (f0 + rng.uniform(-50, 50) * t) * t)
    sig += 0.5 * np.sin(2 * np.pi * rng.uniform(500, 2000) * t)
    sig *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 4) * t)
    sig += 0.05 * rng.standard_normal(n)
    sig = (0.4 * sig / np.max(np.abs(sig))).astype(np.float32)
    if channels > 1:
        sig = np.stack([sig * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
    return sig


SOUNDS = ("chirps", "noise", "hum", "whistle", "drift")


def sound(kind: str, seconds: float, *, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Clips of different character, so even a random model tells them apart: `tone` chirps, white
    noise, a low hum, a high whistle, a slow random drift. (samples,) float32."""
    if kind == "chirps":
        return tone(seconds, rate=rate, seed=seed)
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * rate)))
    t = np.arange(n) / rate
    if kind == "noise":
        x = 0.1 * rng.standard_normal(n)
    elif kind == "hum":
        x = 0.5 * np.sin(2 * np.pi * rng.uniform(100, 250) * t)
    elif kind == "whistle":
        x = 0.5 * np.sin(2 * np.pi * rng.uniform(2500, 4000) * t)
    elif kind == "drift":
        x = rng.standard_normal(n).cumsum()
        x = 0.5 * (x - x.mean()) / (np.abs(x - x.mean()).max() + 1e-9)
    else:
        raise ValueError(f"unknown sound {kind!r}; one of {SOUNDS}")
    return x.astype(np.float32)


def encode(audio: np.ndarray, *, rate: int = RATE, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    """Encode samples (float in [-1, 1]) as WAV/FLAC/OGG/MP3 bytes with soundfile."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def decoded_like_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    """What the tests feed the transformers pipeline: the file decoded by soundfile, mono, float32."""
    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.mean(axis=1).astype(np.float32), rate


# --- running a task without Ray ---------------------------------------------------------------------------


def run_in_process(
    task_name: str, model_dir: Path, values: list[Any], params: dict[str, Any], *, batch_size: int = 4
) -> list[Any]:
    """Preprocess → Arrow tensor round trip → the engine's length-sorted micro-batches → postprocess, in
    this process: what a job does to each row, minus Ray. Returns one output dict or RowError per value."""
    import pyarrow as pa

    from models.registry import ROW_ID, RowError, get_task
    from pipeline.batching import run_micro_batches
    from pipeline.tensors import decode_tensors, encode_tensors

    task = get_task(task_name)
    parsed = task.parse_params(params, key="params")
    features = task.load_preprocessor(str(model_dir), parsed)(
        {"audio": values, ROW_ID: list(range(len(values)))}
    )
    ok = [i for i, f in enumerate(features) if not isinstance(f, RowError)]
    rows = decode_tensors(pa.table(encode_tensors([features[i] for i in ok], prefix="f.")), prefix="f.")
    runner = task.load_runner(str(model_dir), parsed, device="cpu", dtype="float32")
    result = run_micro_batches(runner.forward, rows, [runner.length(r) for r in rows], batch_size=batch_size)
    assert result.errors == [None] * len(rows), result.errors
    post = task.load_postprocessor(str(model_dir), parsed)
    out: list[Any] = list(features)
    for j, i in enumerate(ok):
        kept = {k: v for k, v in rows[j].items() if k in task.postprocess_features}
        out[i] = post(result.outputs[j], inputs={}, features=kept)
    return out


def write_audio_parquet(path: Path, audio: list[Any], **extra: list[Any]) -> Path:
    """Parquet with `id` and an `audio` column (binary, string, or an HF Audio struct {bytes, path})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if all(v is None or isinstance(v, dict) for v in audio):
        column = pa.array(audio, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    elif all(v is None or isinstance(v, str) for v in audio):
        column = pa.array(audio, pa.string())
    else:
        column = pa.array(audio, pa.binary())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(audio))), "audio": column, **extra}), path)
    return path


def audio_job(
    *, input_uri: Path, output_uri: Path, model: Path, task: str, params: dict[str, Any], **stage: Any
) -> Any:
    from pipeline.spec import parse_spec

    return parse_spec(
        {
            "name": "audio-test",
            "input": {"uri": str(input_uri), "id_column": "id", "shard_rows": 8},
            "stages": [
                {
                    "name": "s",
                    "task": task,
                    "model": str(model),
                    "inputs": {"audio": "audio"},
                    "params": params,
                    "batch_size": 3,
                    **stage,
                }
            ],
            "output": {"uri": str(output_uri)},
            "max_error_rate": 1.0,
        }
    )
