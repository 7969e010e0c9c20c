"""Publishing a fine-tuned model: the best epoch's checkpoint → a model folder in the output that
`kind: inference` loads (`OutputDir.publish_folder`: staged, listed in the manifest, then moved in)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from models.loading import resolve_model
from models.lora import merge_lora
from models.registry import FineTunable, get_task
from pipeline.commit import OutputDir
from pipeline.spec import FinetuneSpec
from pipeline.train.loop import METRICS_FILE, TRAIN_STATE

__all__ = ["merge_lora_into", "publish_model"]


def publish_model(
    checkpoint: Any,
    out: OutputDir,
    *,
    metrics: dict[str, Any],
    listed: Callable[[list[str]], None],
    prepare: Callable[[str], None] | None = None,
) -> list[str]:
    """Copy the checkpoint's model files and `train_metrics.json` into the output folder (the caller writes
    `_SUCCESS` last); returns the files. The optimizer state stays behind. `prepare` edits the staged copy
    first (LoRA with `merge: true`: the adapter → the merged model). `listed(files)` runs before any file
    appears (see `OutputDir.publish_folder`)."""

    def fill(stage: str) -> None:
        checkpoint.to_directory(stage)
        Path(stage, TRAIN_STATE).unlink(missing_ok=True)
        if prepare is not None:
            prepare(stage)
        Path(stage, METRICS_FILE).write_text(json.dumps(metrics, indent=1, sort_keys=True, default=str))

    return out.publish_folder(fill, listed=listed)


def merge_lora_into(
    folder: str, *, task: str, base: str, label_names: tuple[str, ...], train: FinetuneSpec
) -> None:
    """`train.lora.merge: true`: checkpoints hold the adapter (resumable, small); the published
    folder is the base with it merged in, built and saved by the task's trainable as in a full fine-tune."""
    base_dir = resolve_model(base)
    trainable = cast(FineTunable, get_task(task)).training(
        base_dir, label_names=label_names, max_length=train.max_length, options=dict(train.options)
    )
    merge_lora(folder, trainable=trainable, base_dir=base_dir)
