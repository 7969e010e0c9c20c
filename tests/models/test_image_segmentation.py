"""image-segmentation: parity with `transformers.pipeline("image-segmentation")` on tiny random SegFormer and
Mask2Former (semantic / instance / panoptic), COCO RLE masks, fine-tuning (loss falls in-process; one
end-to-end `run_finetune` whose output folder then runs in an inference job with broken rows)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.image_segmentation import class_map
from models.masks import decode_mask, encode_mask
from models.registry import RowError, get_task, model_inputs
from pipeline.errors import ModelError, SpecError
from tests.models.seg_depth_helpers import (
    SEG_LABELS,
    SIZES,
    decoded,
    jpeg_bytes,
    make_mask2former,
    make_segformer,
    png_bytes,
    run_in_process,
    shapes_scene,
)

TASK = get_task("image-segmentation")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seg-models")
    return {"segformer": make_segformer(root / "segformer"), "mask2former": make_mask2former(root / "m2f")}


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """8 shape scenes of 8 sizes (odd, portrait, landscape, square), alternately PNG and JPEG."""
    scenes = [shapes_scene(h, w, seed=i)[0] for i, (h, w) in enumerate(SIZES)]
    return [png_bytes(s) if i % 2 == 0 else jpeg_bytes(s) for i, s in enumerate(scenes)]


def _pipeline(model_dir: Path) -> Any:
    from transformers import pipeline

    return pipeline("image-segmentation", model=str(model_dir), device="cpu")


def assert_same_segments(
    rows: list[dict[str, Any]], expected: list[list[dict[str, Any]]]
) -> tuple[int, float]:
    """Same labels in the same order, masks identical after RLE decode, scores within 1e-4 (None where the
    pipeline gives None). Returns (segments compared, worst score difference)."""
    count, worst = 0, 0.0
    for row, exp in zip(rows, expected, strict=True):
        assert [s["label"] for s in row["segments"]] == [e["label"] for e in exp]
        for seg, e in zip(row["segments"], exp, strict=True):
            truth = np.asarray(e["mask"]) > 0  # the pipeline's PIL "L" mask, 0/255 at the original size
            assert seg["mask"]["size"] == list(truth.shape)
            assert np.array_equal(decode_mask(seg["mask"]), truth)
            if e["score"] is None:
                assert seg["score"] is None
            else:
                worst = max(worst, abs(seg["score"] - e["score"]))
            count += 1
    assert worst <= 1e-4
    return count, worst


# --- masks ------------------------------------------------------------------------------------------------


def test_rle_round_trip_and_coco_interop() -> None:
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 13), (64, 48)]:
        for fill in (0.0, 0.3, 1.0):
            mask = rng.random(shape) < fill
            rle = encode_mask(mask)
            assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
            assert np.array_equal(decode_mask(rle), mask)
            # What pycocotools itself reads (bytes counts) and its area agree.
            assert coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode()}) == mask.sum()
    # Uncompressed RLE (run lengths, column-major, 0s first) as COCO JSON files also hold it.
    uncompressed = {"size": [2, 3], "counts": [1, 2, 3]}
    assert decode_mask(uncompressed).T.ravel().tolist() == [False, True, True, False, False, False]
    with pytest.raises(ValueError, match="size"):
        decode_mask({"counts": "abc"})


def test_class_maps_decode_from_png_lists_and_refuse_rgb() -> None:
    from PIL import Image

    _, labels = shapes_scene(20, 30, seed=1)
    assert np.array_equal(class_map(png_bytes(labels)), labels)
    palette = Image.fromarray(labels, mode="L").convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    assert np.array_equal(class_map({"bytes": buf.getvalue(), "path": "m.png"}), labels)
    assert np.array_equal(class_map(labels.tolist()), labels)
    with pytest.raises(ValueError, match="single-channel"):
        class_map(png_bytes(np.stack([labels] * 3, axis=-1)))
    with pytest.raises(ValueError, match="0..255"):
        class_map([[0, 300]])
    with pytest.raises(ValueError, match="does not decode"):
        class_map(b"not a png")


def test_params_are_checked(models: dict[str, Path]) -> None:
    assert TASK.parse_params({}, key="p").threshold == 0.9  # the pipeline's default
    with pytest.raises(SpecError, match=r"p\.threshold"):
        TASK.parse_params({"threshold": 1.5}, key="p")
    with pytest.raises(SpecError, match=r"p\.subtask"):
        TASK.parse_params({"subtask": "depth"}, key="p")
    with pytest.raises(SpecError, match=r"train\.options\.ignore_index"):
        TASK.parse_training_options({"ignore_index": 300}, key="train.options")
    # SegFormer's processor post-processes semantic segmentation only: refused when loading, not per row.
    with pytest.raises(ModelError, match="params.subtask 'instance'"):
        TASK.load_postprocessor(str(models["segformer"]), TASK.parse_params({"subtask": "instance"}, key="p"))


# --- parity (in-process: preprocess → runner → postprocess as the engine chains them) ----------------------


def test_segformer_parity_with_the_pipeline(models: dict[str, Path], images: list[bytes]) -> None:
    """8 images of 8 sizes, 4 per micro-batch: same labels, identical masks, scores None as the pipeline
    called on the same decoded images."""
    rows, raw = run_in_process("image-segmentation", models["segformer"], {}, images, batch_size=4)
    count, _ = assert_same_segments(rows, _pipeline(models["segformer"])([decoded(b) for b in images]))
    assert count >= len(images)  # every image has segments: the comparison is not vacuous
    # Only the logits the processor's postprocess reads come back from the runner, as float32.
    assert all(set(r) == {"logits"} and r["logits"].dtype == np.float32 for r in raw)


@pytest.fixture(scope="module")
def mask2former_runs(models: dict[str, Path], images: list[bytes]) -> dict[str, Any]:
    """Both sides' forward passes once (Mask2Former's is the slow part): our preprocess + runner (4 rows of
    mixed sizes per micro-batch), and the pipeline's own `preprocess` + `forward` per image, which its
    `__call__` chains with `postprocess` (run per params in the test)."""
    _, raw = run_in_process("image-segmentation", models["mask2former"], {}, images, batch_size=4)
    pipe = _pipeline(models["mask2former"])
    pil = [decoded(b) for b in images]
    return {
        "raw": raw,
        "pipe": pipe,
        "forwards": [pipe.forward(pipe.preprocess(im)) for im in pil],
        "pil": pil,
    }


@pytest.mark.parametrize(
    "params",
    [
        {"subtask": "semantic"},
        {"subtask": "instance", "threshold": 0.5},
        {"subtask": "panoptic", "threshold": 0.5},
        {"threshold": 0.4, "mask_threshold": 0.3, "overlap_mask_area_threshold": 0.3},
    ],
    ids=["semantic", "instance", "panoptic", "default-subtask"],
)
def test_mask2former_parity_with_the_pipeline(
    models: dict[str, Path], mask2former_runs: dict[str, Any], params: dict[str, Any]
) -> None:
    """Same labels, identical masks, scores within 1e-4 for each subtask and threshold setting."""
    post = TASK.load_postprocessor(str(models["mask2former"]), TASK.parse_params(params, key="p"))
    sizes = [np.array([im.height, im.width], np.int32) for im in mask2former_runs["pil"]]
    rows = [
        post(r, inputs={}, features={"orig_size": s})
        for r, s in zip(mask2former_runs["raw"], sizes, strict=True)
    ]
    pipe = mask2former_runs["pipe"]
    expected = [pipe.postprocess(out, **params) for out in mask2former_runs["forwards"]]
    count, _ = assert_same_segments(rows, expected)
    assert count >= len(rows)
    assert all(
        set(r) == {"class_queries_logits", "masks_queries_logits"}
        and r["masks_queries_logits"].dtype == np.float32
        for r in mask2former_runs["raw"]
    )


def test_broken_images_become_row_errors(models: dict[str, Path], images: list[bytes]) -> None:
    values = [images[0], None, b"", b"GIF89a-not-really", images[1][:60], images[2]]
    rows, _ = run_in_process("image-segmentation", models["segformer"], {}, values)
    kinds = [r.error_type if isinstance(r, RowError) else "ok" for r in rows]
    assert kinds[0] == kinds[5] == "ok"
    assert all(k != "ok" for k in kinds[1:5]), kinds


# --- fine-tuning ------------------------------------------------------------------------------------------


def _shape_rows(n: int, *, seed: int, size: tuple[int, int] = (48, 64)) -> tuple[list[bytes], list[bytes]]:
    scenes = [shapes_scene(*size, seed=seed + i) for i in range(n)]
    return [png_bytes(im) for im, _ in scenes], [png_bytes(lab) for _, lab in scenes]


@pytest.mark.parametrize("model", ["segformer", "mask2former"])
def test_loss_falls_on_shapes(models: dict[str, Path], model: str) -> None:
    """A few AdamW steps on 4 shape scenes (class maps as PNG): the model's own loss falls, and the eval
    metric counts every labelled pixel."""
    import torch

    trainable = TASK.training(str(models[model]), label_names=SEG_LABELS, max_length=0, options={})
    torch.manual_seed(0)
    net = trainable.build_model(str(models[model])).train()
    image_values, masks = _shape_rows(4, seed=50)
    batch = trainable.encode({"image": image_values}, masks)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(8 if model == "segformer" else 4):  # a Mask2Former step costs ~4 SegFormer steps
        loss = net(**model_inputs(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # SegFormer's cross-entropy falls ~13% in 8 steps here (1.35 → 1.17), Mask2Former's matched mask + class
    # loss ~15% in 4; a broken label path leaves them flat.
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    net.eval()
    with torch.no_grad():
        hits, total = trainable.eval_counts(net(**model_inputs(batch)), batch)
    pixels = batch["pixel_values"].shape[-2] * batch["pixel_values"].shape[-1] * len(masks)
    assert total == pixels and 0 < hits <= total


def test_bad_training_masks_name_the_problem(models: dict[str, Path]) -> None:
    trainable = TASK.training(str(models["segformer"]), label_names=SEG_LABELS, max_length=0, options={})
    image_values, masks = _shape_rows(2, seed=5)
    with pytest.raises(ValueError, match="row 1 .* must have their image's size"):
        trainable.encode({"image": image_values}, [masks[0], png_bytes(np.zeros((5, 5), np.uint8))])
    with pytest.raises(ValueError, match=r"class ids \[7\]"):
        trainable.encode({"image": image_values[:1]}, [np.full((48, 64), 7, np.uint8).tolist()])


@pytest.mark.timeout(300)
def test_finetune_job_then_inference_job(ray_session, models: dict[str, Path], tmp_path: Path) -> None:
    """`kind: finetune` trains SegFormer on shape scenes (masks as PNG class maps) and publishes a folder;
    an inference job on that folder matches the pipeline on it, with 4 broken rows as error records."""
    from jobs.finetune import run_finetune
    from pipeline.commit import read_errors, read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    image_values, masks = _shape_rows(24, seed=100)
    pq.write_table(
        pa.table({"id": list(range(24)), "image": image_values, "mask": masks}), tmp_path / "train.parquet"
    )
    result = run_finetune(
        parse_spec(
            {
                "name": "seg-finetune",
                "kind": "finetune",
                "input": {"uri": str(tmp_path / "train.parquet"), "id_column": "id"},
                "stages": [
                    {
                        "name": "seg",
                        "task": "image-segmentation",
                        "model": str(models["segformer"]),
                        "inputs": {"image": "image"},
                    }
                ],
                "train": {
                    "label_column": "mask",
                    "label_names": list(SEG_LABELS),
                    "epochs": 2,
                    "lr": 3e-3,
                    "batch_size": 6,
                    "eval_fraction": 0.25,
                    "num_workers": 1,
                    "seed": 0,
                },
                "output": {"uri": str(tmp_path / "model")},
            }
        ),
        progress=False,
    )
    losses = [m["train_loss"] for m in result.metrics]
    assert losses[-1] < losses[0], result.metrics
    assert 0 < result.metrics[-1]["eval_accuracy"] <= 1
    # mean IoU (torchmetrics) and pixel accuracy at the masks' own sizes, every epoch; mIoU picks the epoch
    for r in result.metrics:
        assert 0.0 <= r["eval_mean_iou"] <= 1.0 and 0.0 < r["eval_pixel_accuracy"] <= 1.0, r
        assert r["score"] == r["eval_mean_iou"]
    model_dir = tmp_path / "model"

    test_images = [png_bytes(shapes_scene(h, w, seed=500 + i)[0]) for i, (h, w) in enumerate(SIZES)]
    values: list[Any] = [*test_images[:6], {"bytes": test_images[6], "path": "a.png"}]
    (tmp_path / "b.png").write_bytes(test_images[7])
    values.append({"bytes": None, "path": str(tmp_path / "b.png")})
    broken = [
        b"",
        b"\x89PNG\r\n\x1a\n-cut",
        b"<html>not an image</html>",
        {"bytes": None, "path": "/nope.png"},
    ]
    # Every third row is broken, so each 5-row shard mixes good and broken rows.
    order = [values[0], values[1], broken[0], values[2], values[3], broken[1]]
    order += [values[4], values[5], broken[2], values[6], values[7], broken[3]]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    column = [v if isinstance(v, dict) else {"bytes": v, "path": None} for v in order]
    pq.write_table(
        pa.table({"id": list(range(len(column))), "image": pa.array(column, struct)}), tmp_path / "in.parquet"
    )
    spec = parse_spec(
        {
            "name": "seg-infer",
            "input": {"uri": str(tmp_path / "in.parquet"), "id_column": "id", "shard_rows": 5},
            "stages": [
                {
                    "name": "seg",
                    "task": "image-segmentation",
                    "model": str(model_dir),
                    "inputs": {"image": "image"},
                    "batch_size": 3,
                }
            ],
            "output": {"uri": str(tmp_path / "out")},
            "max_error_rate": 0.5,
        }
    )
    run = run_inference(spec, progress=False)
    assert (run.rows_ok, run.rows_error) == (8, 4)
    errors = read_errors(str(tmp_path / "out")).sort_by("id").to_pylist()
    assert sorted(int(e["id"]) for e in errors) == [2, 5, 8, 11]
    assert {e["step"] for e in errors} == {"preprocess"}
    rows = read_output(str(tmp_path / "out")).sort_by("id").to_pylist()
    expected = _pipeline(model_dir)([decoded(b) for b in test_images])
    count, _ = assert_same_segments(rows, expected)
    assert count >= 8
