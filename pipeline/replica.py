"""The actor that hosts one model replica of one task.

It receives blocks of its stage whose rows already carry features (tokenized in CPU tasks), runs the task's forward in
length-sorted micro-batches (`pipeline.batching`), and returns the block with raw outputs. Nothing else
happens here: decoding, tokenizing and postprocessing stay in CPU tasks so the accelerator is not kept
waiting on Python.

The model loads in `__init__` from a path/URI, so Ray can restart a killed replica anywhere and it reloads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from models.loading import resolve_model
from pipeline.batching import run_micro_batches
from pipeline.bind import BoundStage
from pipeline.block import FEATURE, OUTPUT, SHARD, ok_rows, set_errors
from pipeline.metrics import MetricsContext, Recorder, unit_of
from pipeline.tensors import decode_tensors, encode_tensors

__all__ = ["Replica", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)


def resolve_device(device: str, num_gpus: float) -> str:
    if device != "auto":
        return device
    if num_gpus > 0:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """bf16 on GPUs (halves memory traffic; accuracy is unchanged for inference), float32 on CPUs (CPU
    bf16 matmuls are slower than fp32 on most server CPUs without AMX)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


class Replica:
    """One replica of one stage: `stage` is the bound stage (parsed params, resources), not a spec."""

    def __init__(
        self, *, stage: BoundStage, threads: int | None, metrics: MetricsContext | None = None
    ) -> None:
        import torch

        self.stage = stage
        task = stage.task
        if threads is None:
            threads = max(1, os.cpu_count() or 1)
        torch.set_num_threads(threads)
        self.device = resolve_device(stage.device, stage.num_gpus)
        self.dtype = resolve_dtype(stage.dtype, self.device)
        model_dir = resolve_model(stage.model, revision=stage.revision)
        self.runner = task.load_runner(model_dir, stage.params, device=self.device, dtype=self.dtype)
        self.keep_features = {FEATURE + name for name in task.postprocess_features}
        self.metrics = metrics
        log.info(
            "replica ready: stage=%s task=%s model=%s device=%s dtype=%s threads=%d",
            stage.name,
            stage.task_name,
            stage.model,
            self.device,
            self.dtype,
            threads,
        )

    def _on_oom(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __call__(self, table: pa.Table) -> pa.Table:
        features = decode_tensors(table, prefix=FEATURE)
        ok = [i for i in ok_rows(table) if features[i] is not None]
        rows: list[dict[str, Any]] = [features[i] or {} for i in ok]
        lengths = [self.runner.length(r) for r in rows]
        rec = Recorder(self.metrics)
        on_batch: Callable[[list[int], float, float, list[tuple[str, str] | None]], None] | None = None
        if self.metrics is not None and rows:
            unit, pads = unit_of(self.stage.task, self.runner, rows[0])
            shard = ",".join(dict.fromkeys(table.column(SHARD).to_pylist()))

            def record(
                indices: list[int], t_start: float, seconds: float, errors: list[tuple[str, str] | None]
            ) -> None:
                rec.forward(
                    self.stage.name,
                    shard=shard,
                    t_start=t_start,
                    seconds=seconds,
                    lengths=[lengths[j] for j in indices],
                    errors=errors,
                    unit=unit,
                    pads=pads,
                )

            on_batch = record

        result = run_micro_batches(
            self.runner.forward,
            rows,
            lengths,
            batch_size=self.stage.batch_size,
            max_tokens=self.stage.max_batch_tokens,
            on_oom=self._on_oom,
            on_batch=on_batch,
        )
        outputs: list[dict[str, Any] | None] = [None] * table.num_rows
        errors: list[tuple[str, str] | None] = [None] * table.num_rows
        for j, i in enumerate(ok):
            outputs[i] = result.outputs[j]
            errors[i] = result.errors[j]
        if result.oom_splits:
            log.warning(
                "out of memory: split %d micro-batches; lower batch_size or max_batch_tokens",
                result.oom_splits,
            )
        table = set_errors(table, self.stage.name, "forward", errors)
        drop = [n for n in table.column_names if n.startswith(FEATURE) and n not in self.keep_features]
        table = table.drop_columns(drop)
        for name, column in encode_tensors(outputs, prefix=OUTPUT).items():
            table = table.append_column(name, column)
        rec.send()
        return table
