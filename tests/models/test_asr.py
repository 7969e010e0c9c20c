"""automatic-speech-recognition: parity with `transformers.pipeline` on tiny random Wav2Vec2 CTC models (one
Ray job with a 60 s clip chunked; in-process runs for the unchunked, group-norm and timestamp cases), a
tiny random Whisper through the same task, param validation, CTC fine-tuning (loss falls in-process; one
`run_finetune` whose folder runs in an inference job and in the pipeline)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.registry import model_inputs
from pipeline.errors import ModelError, SpecError
from tests.models.audio_helpers import (
    RATE,
    audio_job,
    decoded_like_soundfile,
    encode,
    make_ctc_model,
    make_whisper,
    run_in_process,
    tone,
    write_audio_parquet,
)

TASK = "automatic-speech-recognition"


@pytest.fixture(scope="module")
def ctc_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "layer": make_ctc_model(tmp_path_factory.mktemp("ctc-layer"), layer_norm=True),
        "group": make_ctc_model(tmp_path_factory.mktemp("ctc-group"), layer_norm=False, seed=1),
    }


def _pipe(model: Path) -> Any:
    from transformers import pipeline

    return pipeline(TASK, model=str(model), device="cpu")


def _chunks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The pipeline's chunks as the task writes them: timestamps as [start, end] floats."""
    return [
        {"text": c["text"], "timestamp": [None if t is None else float(t) for t in c["timestamp"]]}
        for c in result.get("chunks", [])
    ]


def _clips(n: int, *, seed: int) -> list[bytes]:
    """Mixed durations (0.2–6 s) in WAV, FLAC and OGG."""
    rng = random.Random(seed)
    fmts = ("WAV", "FLAC", "OGG")
    return [encode(tone(rng.uniform(0.2, 6.0), seed=seed * 100 + i), fmt=fmts[i % 3]) for i in range(n)]


@pytest.mark.timeout(300)
def test_chunked_job_matches_the_pipeline(ray_session, ctc_models: dict[str, Path], tmp_path: Path) -> None:
    """One job, chunk_length_s 10 / stride 2 s with word timestamps: a 60 s clip, a 25 s one at 44.1 kHz
    stereo, and short clips (one chunk each) — texts and timestamped chunks identical to the pipeline's."""
    import soxr

    from pipeline.commit import read_output
    from pipeline.execute import run_inference

    model = ctc_models["layer"]
    values = [encode(tone(60.0, seed=1), fmt="FLAC"), encode(tone(25.0, rate=44_100, seed=2, channels=2))]
    values += _clips(7, seed=3)
    write_audio_parquet(tmp_path / "in.parquet", values)
    params = {"chunk_length_s": 10.0, "stride_length_s": 2.0, "return_timestamps": "word"}
    spec = audio_job(
        input_uri=tmp_path / "in.parquet", output_uri=tmp_path / "out", model=model, task=TASK, params=params
    )
    result = run_inference(spec, progress=False)
    assert (result.rows_ok, result.rows_error) == (len(values), 0)
    got = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    pipe = _pipe(model)
    for i, data in enumerate(values):
        samples, rate = decoded_like_soundfile(data)
        if rate != RATE:  # the pipeline's own resampler needs torchaudio; resampling is ours (soxr)
            samples = soxr.resample(samples, rate, RATE)
        expected = pipe(samples, chunk_length_s=10.0, stride_length_s=2.0, return_timestamps="word")
        assert got[i]["text"] == expected["text"], i
        assert got[i]["chunks"] == _chunks(expected), i
    assert len(got[0]["text"]) > 100 and len(got[0]["chunks"]) > 10  # 60 s of gibberish, many words


@pytest.mark.parametrize(
    ("flavour", "params"),
    [
        ("layer", {}),
        ("layer", {"return_timestamps": "char"}),
        ("group", {"return_timestamps": "word"}),
        ("group", {"chunk_length_s": 3.0, "stride_length_s": [0.5, 1.0]}),
    ],
    ids=["masked-padding", "char-timestamps", "group-norm-exact-batches", "group-norm-chunked"],
)
def test_in_process_parity(ctc_models: dict[str, Path], flavour: str, params: dict[str, Any]) -> None:
    """Mixed durations in micro-batches of 4: padded with masks (layer norm) or batched by equal length
    (group norm) — texts and chunks as the unbatched pipeline's."""
    model = ctc_models[flavour]
    values = _clips(7, seed=4)
    got = run_in_process(TASK, model, values, params, batch_size=4)
    pipe = _pipe(model)
    for row, data in zip(got, values, strict=True):
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
        expected = pipe(decoded_like_soundfile(data)[0], **kwargs)
        assert row["text"] == expected["text"]
        if "return_timestamps" in params:
            assert row["chunks"] == _chunks(expected)
    assert len({row["text"] for row in got}) > 1  # the clips are told apart


@pytest.mark.timeout(180)
def test_whisper_through_the_same_task(tmp_path: Path) -> None:
    """A tiny random Whisper (seq2seq: generate + the tokenizer's `_decode_asr`), 3 clips batched."""
    model = make_whisper(tmp_path / "whisper")
    values = [encode(tone(s, seed=i)) for i, s in enumerate((1.0, 2.5, 4.0))]
    params = {"generate_kwargs": {"num_beams": 1, "max_new_tokens": 12}}
    got = run_in_process(TASK, model, values, params, batch_size=3)
    pipe = _pipe(model)
    for row, data in zip(got, values, strict=True):
        expected = pipe(decoded_like_soundfile(data)[0], generate_kwargs=params["generate_kwargs"])
        assert row["text"] == expected["text"]
        assert row["text"]  # the helper suppresses special tokens: real text, not ""
    with pytest.raises(ModelError, match="char"):
        run_in_process(TASK, model, values[:1], {"return_timestamps": "char"})


def test_params_are_validated(ctc_models: dict[str, Path]) -> None:
    from models.registry import get_task

    task = get_task(TASK)
    for params, key in [
        ({"stride_length_s": 1.0}, "stride_length_s"),
        ({"chunk_length_s": 4.0, "stride_length_s": [2.0, 2.0]}, "stride_length_s"),
        ({"chunk_length_s": -1.0}, "chunk_length_s"),
        ({"return_timestamps": "sentence"}, "return_timestamps"),
        ({"max_duration_s": 0}, "max_duration_s"),
        ({"chunk_batch_size": 0}, "chunk_batch_size"),
        ({"chunk_lenght_s": 10}, "chunk_lenght_s"),
    ]:
        with pytest.raises(SpecError) as err:
            task.parse_params(params, key="stages[0].params")
        assert err.value.key == f"stages[0].params.{key}"
    # Model-dependent: CTC gives char/word timestamps, not Whisper's segments.
    with pytest.raises(ModelError, match="char"):
        run_in_process(TASK, ctc_models["layer"], [encode(tone(1.0))], {"return_timestamps": True})
    assert set(task.output_schema(task.parse_params({}, key="p")).names) == {"text"}
    with_chunks = task.output_schema(task.parse_params({"return_timestamps": "word"}, key="p"))
    assert with_chunks.names == ["text", "chunks"]


# --- fine-tuning ------------------------------------------------------------------------------------------

# Three "phonemes", each a 0.12 s tone: a transcript is a sequence of them, spaces as short silences.
_PHONES = {"a": 300.0, "b": 900.0, "c": 2000.0}


def _spoken(text: str, *, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = []
    for ch in text:
        n = int(0.12 * RATE)
        if ch == " ":
            parts.append(np.zeros(n // 2, np.float32))
            continue
        t = np.arange(n) / RATE
        parts.append(0.5 * np.sin(2 * np.pi * _PHONES[ch] * rng.uniform(0.97, 1.03) * t).astype(np.float32))
    audio = np.concatenate(parts)
    return (audio + 0.01 * rng.standard_normal(len(audio))).astype(np.float32)


def _transcripts(n: int, *, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 3))) for _ in range(12)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def test_ctc_vocabulary_and_loss_falls_in_process(ctc_models: dict[str, Path]) -> None:
    """The vocabulary comes from the transcripts (driver hook); a few AdamW steps on one batch lower the
    CTC loss; eval_counts is (characters right, characters) of greedy decoding."""
    import torch

    from models.registry import get_task

    task = get_task(TASK)
    texts = _transcripts(8, seed=0)
    names = task.training_label_names(texts + ["  A  b "], options={}, key="train.label_column")
    assert names == ("a", "b", "c")  # lower-cased, whitespace is the word delimiter, not a character
    with pytest.raises(SpecError, match="not strings"):
        task.training_label_names(["ab", 3], options={}, key="train.label_column")
    trainable = task.training(str(ctc_models["layer"]), label_names=names, max_length=128, options={})
    assert trainable.tokenizer.convert_ids_to_tokens(list(range(8))) == [
        "<pad>", "<s>", "</s>", "<unk>", "|", "a", "b", "c"
    ]  # fmt: skip
    torch.manual_seed(0)
    model = trainable.build_model(str(ctc_models["layer"]))
    assert model.lm_head.out_features == 8 and model.config.pad_token_id == 0
    audio = [encode(_spoken(t, seed=i)) for i, t in enumerate(texts)]
    batch = trainable.encode({"audio": audio}, texts)
    assert batch["labels"].shape[0] == 8 and (batch["labels"] == -100).any()  # padded with -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with torch.no_grad():
        hits, total = trainable.eval_counts(model(**model_inputs(batch)), batch)
    assert total == sum(len(t) for t in texts) and 0 <= hits <= total


@pytest.mark.timeout(400)
def test_finetune_job_then_inference_on_its_folder(
    ray_session, ctc_models: dict[str, Path], tmp_path: Path
) -> None:
    """`kind: finetune` (CTC, vocabulary from the transcripts) on Ray Train; the published folder is a
    processor + model: an inference job on it gives the pipeline's texts on the same folder."""
    import json

    from jobs.finetune import run_finetune
    from pipeline.commit import read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    texts = _transcripts(48, seed=1)
    audio = [encode(_spoken(t, seed=i), fmt="FLAC") for i, t in enumerate(texts)]
    write_audio_parquet(tmp_path / "train.parquet", audio, transcript=texts)
    spec = parse_spec(
        {
            "name": "ctc-finetune",
            "kind": "finetune",
            "input": {"uri": str(tmp_path / "train.parquet"), "id_column": "id"},
            "stages": [
                {"name": "asr", "task": TASK, "model": str(ctc_models["group"]), "inputs": {"audio": "audio"}}
            ],
            "output": {"uri": str(tmp_path / "model")},
            "train": {
                "label_column": "transcript",
                "epochs": 3,
                "lr": 3e-3,
                "batch_size": 8,
                "eval_fraction": 0.25,
            },
        }
    )
    result = run_finetune(spec, progress=False)
    assert result.label_names == ("a", "b", "c")
    # The eval split is by a hash of the row id: about eval_fraction of the 48 clips, none lost.
    assert result.train_rows + result.eval_rows == 48 and 6 <= result.eval_rows <= 18, result
    first, last = result.metrics[0], result.metrics[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["eval_loss"] < first["eval_loss"]
    assert 0.0 <= last["eval_accuracy"] <= 1.0  # 1 - character error rate
    # jiwer WER/CER of greedy CTC decoding, every epoch; lower WER is better, so the score is -WER
    assert all(r["eval_wer"] >= 0.0 and r["eval_cer"] >= 0.0 for r in result.metrics), result.metrics
    assert all(r["score"] == -r["eval_wer"] for r in result.metrics)
    out = Path(result.output_uri)
    vocab = json.loads((out / "vocab.json").read_text())
    assert sorted(vocab, key=vocab.get) == ["<pad>", "<s>", "</s>", "<unk>", "|", "a", "b", "c"]
    assert (out / "preprocessor_config.json").exists() and (out / "model.safetensors").exists()

    test_texts = _transcripts(6, seed=2)
    test_audio = [encode(_spoken(t, seed=100 + i)) for i, t in enumerate(test_texts)]
    write_audio_parquet(tmp_path / "test.parquet", test_audio)
    job = audio_job(
        input_uri=tmp_path / "test.parquet", output_uri=tmp_path / "preds", model=out, task=TASK, params={}
    )
    assert run_inference(job, progress=False).rows_ok == 6
    got = {r["id"]: r["text"] for r in read_output(str(tmp_path / "preds")).to_pylist()}
    pipe = _pipe(out)
    for i, data in enumerate(test_audio):
        assert got[i] == pipe(decoded_like_soundfile(data)[0])["text"]
        assert set(got[i]) <= set("abc |<>spun/")  # the job's alphabet (and the specials' spelling)
