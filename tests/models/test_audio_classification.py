"""audio-classification: parity with `transformers.pipeline("audio-classification")` on tiny random Wav2Vec2
classifiers (one Ray job; in-process runs for group norm and the params), and fine-tuning in-process (loss
falls; the saved folder loads in the pipeline and in the task)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.models.audio_helpers import (
    RATE,
    SOUNDS,
    audio_job,
    decoded_like_soundfile,
    encode,
    make_audio_classifier,
    run_in_process,
    sound,
    tone,
    write_audio_parquet,
)

TASK = "audio-classification"


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "layer": make_audio_classifier(tmp_path_factory.mktemp("clf-layer"), layer_norm=True),
        "group": make_audio_classifier(tmp_path_factory.mktemp("clf-group"), layer_norm=False, seed=1),
    }


def _pipe(model: Path) -> Any:
    from transformers import pipeline

    return pipeline(TASK, model=str(model), device="cpu")


def _values(n: int, *, seed: int) -> list[Any]:
    """Mixed durations (0.1–8 s), containers and input forms."""
    rng = random.Random(seed)
    out: list[Any] = []
    for i in range(n):
        x = sound(SOUNDS[i % len(SOUNDS)], rng.uniform(0.1, 8.0), seed=seed * 100 + i)
        out.append(encode(x, fmt=("WAV", "FLAC", "OGG", "MP3")[i % 4]))
    return out


@pytest.mark.timeout(240)
def test_job_matches_the_pipeline(ray_session, classifiers: dict[str, Path], tmp_path: Path) -> None:
    """All labels scored (top_k null): the same labels in the same order, scores within 1e-4, for 14
    clips of mixed durations and formats batched 3 at a time (padded with attention masks)."""
    from pipeline.commit import read_output
    from pipeline.execute import run_inference

    model = classifiers["layer"]
    values = _values(14, seed=1)
    write_audio_parquet(tmp_path / "in.parquet", values)
    spec = audio_job(
        input_uri=tmp_path / "in.parquet",
        output_uri=tmp_path / "out",
        model=model,
        task=TASK,
        params={"top_k": None},
    )
    result = run_inference(spec, progress=False)
    assert (result.rows_ok, result.rows_error) == (14, 0)
    got = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    pipe = _pipe(model)
    worst = 0.0
    for i, data in enumerate(values):
        expected = pipe(decoded_like_soundfile(data)[0], top_k=None)
        assert got[i]["label"] == expected[0]["label"]
        assert [s["label"] for s in got[i]["scores"]] == [e["label"] for e in expected]
        diffs = [abs(s["score"] - e["score"]) for s, e in zip(got[i]["scores"], expected, strict=True)]
        worst = max(worst, *diffs)
    assert worst <= 1e-4
    assert len({r["label"] for r in got.values()}) > 1  # the random model does tell clips apart


@pytest.mark.parametrize(
    ("flavour", "params", "pipe_kwargs"),
    [
        ("group", {}, {"top_k": 1}),
        ("layer", {"top_k": 2, "function_to_apply": "sigmoid"}, {"top_k": 2, "function_to_apply": "sigmoid"}),
        ("group", {"top_k": 99}, {"top_k": 99}),
    ],
    ids=["group-norm-exact-batches", "top2-sigmoid", "top-k-above-labels"],
)
def test_in_process_parity(
    classifiers: dict[str, Path], flavour: str, params: dict[str, Any], pipe_kwargs: dict[str, Any]
) -> None:
    model = classifiers[flavour]
    values = _values(8, seed=2)
    got = run_in_process(TASK, model, values, params, batch_size=4)
    pipe = _pipe(model)
    for row, data in zip(got, values, strict=True):
        expected = pipe(decoded_like_soundfile(data)[0], **pipe_kwargs)
        assert row["label"] == expected[0]["label"]
        assert row["score"] == pytest.approx(expected[0]["score"], abs=1e-4)
        if params.get("top_k", 1) != 1:
            assert [(s["label"], pytest.approx(s["score"], abs=1e-4)) for s in row["scores"]] == [
                (e["label"], e["score"]) for e in expected
            ]
    if params.get("top_k") == 99:
        assert len(got[0]["scores"]) == 4  # capped at the model's labels, as the pipeline does


def test_pad_batching_runs_group_norm_models_in_one_forward(classifiers: dict[str, Path]) -> None:
    """`batching: pad` trades exactness for speed on models trained without masks: one padded forward,
    every row still scored, the longest clip (no padding) exactly as unbatched."""
    values = [encode(tone(s, seed=i)) for i, s in enumerate((2.0, 1.0, 1.5))]
    exact = run_in_process(TASK, classifiers["group"], values, {"top_k": None}, batch_size=3)
    padded = run_in_process(
        TASK, classifiers["group"], values, {"top_k": None, "batching": "pad"}, batch_size=3
    )

    def scores(row: dict[str, Any]) -> list[float]:
        return [s["score"] for s in sorted(row["scores"], key=lambda s: s["label"])]

    assert scores(padded[0]) == pytest.approx(scores(exact[0]), abs=1e-5)  # the longest: no padding
    assert scores(padded[1]) != pytest.approx(scores(exact[1]), abs=1e-7)  # padded: GroupNorm sees zeros
    assert all(len(r["scores"]) == 4 for r in padded)


# --- fine-tuning ------------------------------------------------------------------------------------------


def _two_classes(n: int, *, seed: int) -> tuple[list[bytes], list[int]]:
    """Low hum (label 0) vs high whistle (label 1), random lengths and phases."""
    rng = np.random.default_rng(seed)
    clips, labels = [], []
    for i in range(n):
        label = i % 2
        t = np.arange(int(rng.uniform(0.3, 1.0) * RATE)) / RATE
        f = rng.uniform(150, 300) if label == 0 else rng.uniform(2500, 4000)
        x = 0.5 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) + 0.02 * rng.standard_normal(len(t))
        clips.append(encode(x.astype(np.float32), fmt="FLAC"))
        labels.append(label)
    return clips, labels


def test_finetune_loss_falls_and_folder_runs(classifiers: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from models.registry import get_task

    task = get_task(TASK)
    assert (task.training_labels, task.training_text_inputs) == ("class", ())
    trainable = task.training(
        str(classifiers["group"]), label_names=("hum", "whistle"), max_length=128, options={}
    )
    torch.manual_seed(0)
    model = trainable.build_model(str(classifiers["group"]))
    assert model.config.id2label == {0: "hum", 1: "whistle"}
    clips, labels = _two_classes(16, seed=0)
    batch = trainable.encode({"audio": clips}, labels)
    assert batch["input_values"].shape[0] == 16 and batch["labels"].tolist() == labels
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():  # the epoch's task metric on the rows it learned
        metrics = trainable.eval_metrics(trainable.eval_predictions(model(**batch), batch, model=model))
    assert 0.8 <= metrics["eval_macro_f1"] <= 1.0, metrics
    trainable.save(model, str(tmp_path / "out"))
    test_clips, test_labels = _two_classes(8, seed=1)
    got = run_in_process(TASK, tmp_path / "out", test_clips, {}, batch_size=4)
    pipe = _pipe(tmp_path / "out")
    for row, data in zip(got, test_clips, strict=True):
        expected = pipe(decoded_like_soundfile(data)[0], top_k=1)[0]
        assert (row["label"], row["score"]) == (expected["label"], pytest.approx(expected["score"], abs=1e-4))
    accuracy = np.mean(
        [row["label"] == ("hum", "whistle")[y] for row, y in zip(got, test_labels, strict=True)]
    )
    assert accuracy >= 0.75  # held-out clips of the two sounds
    with pytest.raises(ValueError, match="training clip"):
        trainable.encode({"audio": [clips[0], b"garbage"]}, [0, 1])
