"""Micro-batching inside a replica: a shard's rows sorted by length into batches bounded by `batch_size`
and a token budget, padded per batch (by the task's runner), outputs restored to row order.

Failure isolation lives here, for every task alike:
- CUDA out-of-memory → split the batch in halves and retry; a single row that still does not fit becomes
  an error record.
- any other exception → retry the batch row by row, so one bad row costs only itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["BatchResult", "is_oom", "plan_micro_batches", "run_micro_batches"]


def plan_micro_batches(
    lengths: Sequence[int], *, batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Row indices grouped into micro-batches, longest first.

    Sorting by length makes each batch's padded length close to its rows' lengths, which is where most
    of the speed over fixed, unsorted batches comes from. A batch grows while rows < batch_size and
    (rows × longest length) <= max_tokens; a single row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(1, int(lengths[i]))
        new_longest = max(longest, n)
        too_many = len(current) >= batch_size
        too_big = max_tokens is not None and current and new_longest * (len(current) + 1) > max_tokens
        if current and (too_many or too_big):
            batches.append(current)
            current, new_longest = [], n
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def is_oom(exc: BaseException) -> bool:
    """CUDA (or other accelerator) out-of-memory, as raised by torch."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class BatchResult:
    """Outputs aligned with the input rows; a row has either an output or an (error_type, message)."""

    def __init__(self, n: int) -> None:
        self.outputs: list[dict[str, Any] | None] = [None] * n
        self.errors: list[tuple[str, str] | None] = [None] * n
        self.oom_splits = 0


def run_micro_batches(
    forward: Callable[[list[Mapping[str, Any]]], list[dict[str, Any]]],
    rows: Sequence[Mapping[str, Any]],
    lengths: Sequence[int],
    *,
    batch_size: int,
    max_tokens: int | None = None,
    on_oom: Callable[[], None] | None = None,
    on_batch: Callable[[list[int], float, float, list[tuple[str, str] | None]], None] | None = None,
) -> BatchResult:
    """Run `forward` over `rows` in length-sorted micro-batches with OOM splitting and row isolation.

    `on_batch(indices, t_start, seconds, errors)` is called after each planned micro-batch (its splits and
    row retries included) with its rows' errors (None for a row with an output), e.g. to record its latency
    and padding (pipeline.metrics)."""
    result = BatchResult(len(rows))

    def run(indices: list[int]) -> None:
        try:
            outs = forward([rows[i] for i in indices])
            if len(outs) != len(indices):
                raise RuntimeError(f"forward returned {len(outs)} outputs for {len(indices)} rows")
        except Exception as e:  # noqa: BLE001 - isolated below, never swallowed silently
            if is_oom(e):
                if on_oom is not None:
                    on_oom()
                if len(indices) > 1:
                    result.oom_splits += 1
                    half = len(indices) // 2
                    run(indices[:half])
                    run(indices[half:])
                    return
                result.errors[indices[0]] = ("OutOfMemoryError", f"one row does not fit on the device: {e}")
                return
            if len(indices) > 1:
                for i in indices:
                    run([i])
                return
            result.errors[indices[0]] = (type(e).__name__, str(e) or repr(e))
            return
        for i, out in zip(indices, outs, strict=True):
            result.outputs[i] = out

    for batch in plan_micro_batches(lengths, batch_size=batch_size, max_tokens=max_tokens):
        t_start = time.time()
        run(batch)
        if on_batch is not None:
            on_batch(batch, t_start, time.time() - t_start, [result.errors[i] for i in batch])
    return result
