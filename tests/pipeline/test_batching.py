"""Micro-batching in the replica: length-sorted batches within budgets, OOM split-and-retry, one bad row
costs only itself, outputs come back in row order."""

from __future__ import annotations

import torch

from pipeline.batching import plan_micro_batches, run_micro_batches


def test_batches_are_length_sorted_and_respect_both_budgets():
    lengths = [5, 50, 7, 49, 6, 48, 100]
    batches = plan_micro_batches(lengths, batch_size=2, max_tokens=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6]  # 100 tokens: a second row (2 × 100) would exceed 120
    for b in batches:
        assert len(b) <= 2 and max(lengths[i] for i in b) * len(b) <= 120 or len(b) == 1
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    unsorted = sum(max(lengths[i : i + 2]) * len(lengths[i : i + 2]) for i in range(0, len(lengths), 2))
    assert padded < unsorted


def test_outputs_are_restored_to_row_order():
    rows = [{"x": i} for i in range(10)]
    result = run_micro_batches(
        lambda b: [{"y": r["x"] * 2} for r in b], rows, [i % 3 for i in range(10)], batch_size=4
    )
    assert [o["y"] for o in result.outputs] == [2 * i for i in range(10)]
    assert result.errors == [None] * 10


def test_out_of_memory_splits_the_batch_until_it_fits():
    calls = []

    def forward(batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [{"y": r["x"]} for r in batch]

    rows = [{"x": i} for i in range(8)]
    result = run_micro_batches(forward, rows, [1] * 8, batch_size=8)
    assert [o["y"] for o in result.outputs] == list(range(8))
    assert calls[0] == 8 and max(calls[1:]) <= 4 and result.oom_splits == 3


def test_a_row_that_never_fits_is_an_error_and_the_rest_succeed():
    def forward(batch):
        if any(r["x"] == 3 for r in batch):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [{"y": r["x"]} for r in batch]

    result = run_micro_batches(forward, [{"x": i} for i in range(6)], [1] * 6, batch_size=6)
    assert result.errors[3][0] == "OutOfMemoryError"
    assert [o["y"] if o else None for o in result.outputs] == [0, 1, 2, None, 4, 5]


def test_a_failing_row_is_isolated_from_its_batch():
    def forward(batch):
        if any(r["x"] == 4 for r in batch):
            raise ValueError("bad value 4")
        return [{"y": r["x"]} for r in batch]

    result = run_micro_batches(forward, [{"x": i} for i in range(9)], [1] * 9, batch_size=9)
    assert result.errors[4] == ("ValueError", "bad value 4")
    assert sum(e is not None for e in result.errors) == 1
    assert [o["y"] for i, o in enumerate(result.outputs) if i != 4] == [0, 1, 2, 3, 5, 6, 7, 8]
