"""image-classification: parity with `transformers.pipeline("image-classification")` on tiny random ViT and
ConvNeXT models, params, fine-tuning (in-process loss, one Ray Train job whose output runs in inference)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.registry import ROW_ID, RowError, get_task
from pipeline.batching import run_micro_batches
from pipeline.errors import SpecError
from tests.models.vision_helpers import (
    COLOR_NAMES,
    color_images,
    make_convnext_classifier,
    make_vit_classifier,
    noise_images,
)

TASK = get_task("image-classification")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clf")
    return {
        "vit": make_vit_classifier(root / "vit"),
        "convnext": make_convnext_classifier(root / "convnext", seed=1),
    }


def _pipeline(model: Path) -> Any:
    from transformers import pipeline

    return pipeline("image-classification", model=str(model), device="cpu")


def _pil(images: list[bytes]) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(b)) for b in images]


def _run_in_process(model: Path, params: dict[str, Any], images: list[Any], *, batch_size: int) -> list[Any]:
    """The task's three stages as the engine chains them (micro-batches included), without Ray."""
    p = TASK.parse_params(params, key="params")
    features = TASK.load_preprocessor(str(model), p)({"image": images, ROW_ID: list(range(len(images)))})
    ok = [f for f in features if not isinstance(f, RowError)]
    runner = TASK.load_runner(str(model), p, device="cpu", dtype="float32")
    result = run_micro_batches(runner.forward, ok, [runner.length(f) for f in ok], batch_size=batch_size)
    assert all(e is None for e in result.errors), result.errors
    post = TASK.load_postprocessor(str(model), p)
    outputs = iter(result.outputs)
    return [f if isinstance(f, RowError) else post(next(outputs), inputs={}, features={}) for f in features]


def _assert_same(
    rows: list[dict[str, Any]], expected: list[list[dict[str, Any]]], *, all_scores: bool
) -> float:
    worst = 0.0
    for row, exp in zip(rows, expected, strict=True):
        assert row["label"] == exp[0]["label"]
        worst = max(worst, abs(row["score"] - exp[0]["score"]))
        if all_scores:
            assert [s["label"] for s in row["scores"]] == [e["label"] for e in exp]
            worst = max(
                worst, *(abs(s["score"] - e["score"]) for s, e in zip(row["scores"], exp, strict=True))
            )
        else:
            assert "scores" not in row
    assert worst <= 1e-4
    return worst


@pytest.mark.parametrize(
    ("arch", "params"),
    [
        ("vit", {}),
        ("vit", {"top_k": 3, "function_to_apply": "sigmoid"}),
        ("convnext", {"top_k": None}),
        ("convnext", {"top_k": 2, "function_to_apply": "none"}),
    ],
    ids=["vit-top1", "vit-top3-sigmoid", "convnext-all", "convnext-top2-none"],
)
def test_parity_with_the_pipeline_in_process(models, arch: str, params: dict[str, Any]) -> None:
    """Same labels, scores within 1e-4, for images of many sizes batched 7 at a time (uint8 transfer)."""
    images = noise_images(24, seed=7)
    rows = _run_in_process(models[arch], params, images, batch_size=7)
    pipe_kwargs = dict(params)
    pipe_kwargs["top_k"] = params.get("top_k", 1) or len(COLOR_NAMES) + 2  # None: every one of 5 labels
    expected = _pipeline(models[arch])(_pil(images), **pipe_kwargs)
    _assert_same(rows, expected, all_scores=params.get("top_k", 1) != 1)


def test_params_are_checked() -> None:
    with pytest.raises(SpecError) as info:
        TASK.parse_params({"top_k": 0}, key="stages[0].params")
    assert info.value.key == "stages[0].params.top_k"
    with pytest.raises(SpecError) as info:
        TASK.parse_params({"max_pixels": 0}, key="stages[0].params")
    assert info.value.key == "stages[0].params.max_pixels"
    with pytest.raises(SpecError) as info:
        TASK.parse_params({"function_to_apply": "relu"}, key="stages[0].params")
    assert info.value.key == "stages[0].params.function_to_apply"
    with pytest.raises(SpecError) as info:
        TASK.parse_params({"topk": 2}, key="stages[0].params")
    assert info.value.key == "stages[0].params.topk"
    schema = TASK.output_schema(TASK.parse_params({"top_k": 2}, key="p"))
    assert schema.names == ["label", "score", "scores"]


# --- fine-tuning ------------------------------------------------------------------------------------------


def test_training_loss_falls_in_process(models) -> None:
    """The Trainable on its own: 12 AdamW steps on colour images → loss falls; undecodable rows are dropped."""
    import torch

    trainable = TASK.training(str(models["vit"]), label_names=COLOR_NAMES, max_length=0, options={})
    torch.manual_seed(0)
    model = trainable.build_model(str(models["vit"]))
    assert model.config.id2label == dict(enumerate(COLOR_NAMES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, labels = color_images(32, seed=3)
    ids = [COLOR_NAMES.index(label) for label in labels]
    batch = trainable.encode({"image": images + [b"not an image"]}, ids + [0])
    assert batch["pixel_values"].shape == (32, 3, 32, 32) and batch["labels"].tolist() == ids
    losses = []
    model.train()
    for _ in range(12):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.timeout(400)
def test_finetune_then_inference_matches_the_pipeline(ray_session, models, tmp_path: Path) -> None:
    """`kind: finetune` on colour images (a ConvNeXT from a random start), then an inference job on the
    published folder: it learned the rule, and its outputs equal the pipeline's on the same folder."""
    from jobs.finetune import run_finetune
    from pipeline.commit import read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    images, labels = color_images(160, seed=0)
    pq.write_table(
        pa.table({"id": list(range(160)), "image": pa.array(images, pa.binary()), "label": labels}),
        tmp_path / "train.parquet",
    )
    result = run_finetune(
        parse_spec(
            {
                "name": "colours",
                "kind": "finetune",
                "input": {"uri": str(tmp_path / "train.parquet"), "id_column": "id"},
                "stages": [
                    {
                        "name": "clf",
                        "task": "image-classification",
                        "model": str(models["convnext"]),
                        "inputs": {"image": "image"},
                    }
                ],
                "output": {"uri": str(tmp_path / "model")},
                # One epoch of 8 steps: enough for this rule (a ConvNeXT reaches 100% in 10 steps here).
                "train": {"epochs": 1, "lr": 5e-3, "batch_size": 16, "eval_fraction": 0.2, "seed": 0},
            }
        ),
        progress=False,
    )
    assert result.label_names == tuple(sorted(COLOR_NAMES))
    assert result.metrics[-1]["eval_loss"] < np.log(3)  # better than chance over 3 classes
    assert result.metrics[-1]["eval_accuracy"] >= 0.8, result.metrics
    assert result.metrics[-1]["eval_macro_f1"] >= 0.7, result.metrics  # the epoch's task metric

    test_images, test_labels = color_images(60, seed=1)
    test_images[5] = b"\xff\xd8\xff broken"  # one bad row: an error record, the job goes on
    pq.write_table(
        pa.table({"id": list(range(60)), "image": pa.array(test_images, pa.binary()), "truth": test_labels}),
        tmp_path / "test.parquet",
    )
    spec = parse_spec(
        {
            "name": "colours-eval",
            "input": {
                "uri": str(tmp_path / "test.parquet"),
                "id_column": "id",
                "keep_columns": ["id", "truth"],
                "shard_rows": 25,
            },
            "stages": [
                {
                    "name": "clf",
                    "task": "image-classification",
                    "model": str(tmp_path / "model"),
                    "inputs": {"image": "image"},
                    "params": {"top_k": None},
                    "batch_size": 8,
                }
            ],
            "output": {"uri": str(tmp_path / "out")},
            "max_error_rate": 0.05,
        }
    )
    job = run_inference(spec, progress=False)
    assert (job.rows_ok, job.rows_error) == (59, 1)
    rows = read_output(str(tmp_path / "out")).sort_by("id").to_pylist()
    assert [r["id"] for r in rows] == [i for i in range(60) if i != 5]
    accuracy = np.mean([r["label"] == r["truth"] for r in rows])
    assert accuracy >= 0.8
    expected = _pipeline(tmp_path / "model")(_pil([test_images[r["id"]] for r in rows]), top_k=3)
    _assert_same(rows, expected, all_scores=True)
