"""What fine-tuning deletes and publishes on disk: only its own names (pipeline.train.trainer.clear_checkpoints,
OutputDir.publish_folder through pipeline.train.publish.publish_model), never a file someone else put there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray.train import Checkpoint

from pipeline.commit import OutputDir
from pipeline.train.loop import METRICS_FILE, TRAIN_STATE
from pipeline.train.publish import publish_model
from pipeline.train.trainer import clear_checkpoints


def _ray_train_run(folder: Path) -> None:
    """A run folder as Ray Train V2 leaves it (names seen in this project's fine-tune tests)."""
    (folder / "checkpoint_2026-12-02_15-57-08.841923").mkdir(parents=True)
    (folder / "checkpoint_2026-12-02_15-57-08.841923" / "model.safetensors").write_bytes(b"w")
    (folder / "checkpoint_manager_snapshot.json").write_text("{}")
    (folder / ".validate_storage_marker").write_text("")


def test_clear_checkpoints_removes_a_ray_train_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "ckpt" / "job-0123456789ab"
    _ray_train_run(run)
    (tmp_path / "ckpt" / "other-run").mkdir()
    clear_checkpoints(str(run), {})
    assert not run.exists()
    assert (tmp_path / "ckpt" / "other-run").is_dir()  # a sibling run is not touched
    clear_checkpoints(str(run), {})  # nothing there: a no-op


def test_clear_checkpoints_keeps_files_it_did_not_write(tmp_path: Path) -> None:
    run = tmp_path / "job-0123456789ab"
    _ray_train_run(run)
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    (run / "data" / "train.parquet").write_bytes(b"rows")
    clear_checkpoints(str(run), {})
    assert sorted(p.name for p in run.iterdir()) == ["data", "notes.txt"]
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "data" / "train.parquet").read_bytes() == b"rows"


def test_clear_checkpoints_leaves_a_file_at_the_path_alone(tmp_path: Path) -> None:
    path = tmp_path / "job-0123456789ab"
    path.write_text("not a folder")
    clear_checkpoints(str(path), {})
    assert path.read_text() == "not a folder"


def _checkpoint(tmp_path: Path) -> Checkpoint:
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "bert"}')
    (src / "model.safetensors").write_bytes(b"weights")
    (src / TRAIN_STATE).write_bytes(b"optimizer")
    return Checkpoint.from_directory(str(src))


def test_publish_moves_the_model_in_and_leaves_the_checkpoint_and_other_files(tmp_path: Path) -> None:
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "_manifest.json").write_text("{}")
    listed: list[list[str]] = []

    def seen(files: list[str]) -> None:  # called before any file appears in the output
        listed.append(files)
        assert not (out_dir / "config.json").exists()

    files = publish_model(_checkpoint(tmp_path), OutputDir(str(out_dir)), metrics={"epochs": []}, listed=seen)
    assert files == sorted(["config.json", "model.safetensors", METRICS_FILE]) == listed[0]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*files, "_manifest.json"])  # no staging left
    assert json.loads((out_dir / METRICS_FILE).read_text()) == {"epochs": []}
    # the optimizer state was dropped from the staged copy only: the checkpoint keeps it
    assert (tmp_path / "ckpt" / TRAIN_STATE).read_bytes() == b"optimizer"


def test_a_failed_publish_removes_only_its_staging_folder(tmp_path: Path) -> None:
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")

    def broken(stage: str) -> None:
        Path(stage, "half.bin").write_bytes(b"x")
        raise RuntimeError("merge failed")

    with pytest.raises(RuntimeError, match="merge failed"):
        publish_model(
            _checkpoint(tmp_path), OutputDir(str(out_dir)), metrics={}, listed=lambda f: None, prepare=broken
        )
    assert sorted(p.name for p in out_dir.iterdir()) == ["notes.txt"]
    assert (out_dir / "notes.txt").read_text() == "mine"
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == b"weights"
