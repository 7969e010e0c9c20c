"""`kind: finetune`: fine-tune a task's model on Ray Train and write a folder that `kind: inference` loads.

    driver   check the output location and the base model                    ← before Ray starts
             plan shards of `input` (+ `train.eval_input`) as inference does (file metadata)
          → streaming pass, a Ray Data job: each task reads a shard (`read_shard`) and returns a summary;
            the driver merges them: parse errors, null/non-text inputs, label names and per-class counts
            (every data error is here, before anything is written and before training starts)
          → train / eval: lazy `from_items(shards) → map_batches(read, labels → ids)`; eval rows are those
            whose id hashes (seeded) into `eval_fraction`, unless `train.eval_input` is given
          → TorchTrainer(ScalingConfig(num_workers, use_gpu)), each worker:
               builds the task's `Trainable`, `prepare_model` (DDP: gloo on CPU, NCCL on GPU)
               per epoch: its `get_dataset_shard("train")` → encode → AdamW step, linear warmup + decay
                          eval rows with `row % world_size == rank` → loss / accuracy sums, all-reduced;
                          the task's (prediction, reference) pairs → gathered on rank 0 → task metrics
                          rank 0: checkpoint (HF folder + optimizer state) → `ray.train.report`
          → driver: last checkpoint → output folder (staged, then moved in), train_metrics.json, `_SUCCESS`

Task hooks. The loop is task-agnostic; what it needs from a task is reached through the task object:

    class FineTunable(Protocol):           # the registered task, e.g. models.text_classification
        training_labels: str               # how train.label_column is read (absent: "class"), see Labels
        training_text_inputs: tuple[str, ...]  # inputs that must be non-null strings (absent: all)
        def training(self, base_dir, *, label_names, max_length, options) -> Trainable: ...
        # optional, on the driver before Ray starts (pipeline.spec calls it when validating):
        def parse_training_options(self, options, *, key) -> Any: ...
        # optional, "raw" labels without train.label_names: names derived from the targets (driver side)
        def training_label_names(self, values, *, options, key) -> tuple[str, ...]: ...

    class Trainable(Protocol):             # built inside each worker
        def build_model(self, weights_dir) -> torch.nn.Module   # base or checkpoint, head sized to labels
        def encode(self, columns, labels) -> dict[str, Any]     # model(**batch) gives .loss
        def save(self, model, out_dir) -> None                  # standard HF folder
        # optional: (hits, total) for eval_accuracy; default below
        def eval_counts(self, output, batch) -> tuple[float, float]: ...
        # optional, the task metrics of every epoch (all three or none; see "Task metrics"):
        eval_score: tuple[str, "max" | "min"]   # the record key that picks the best epoch, and its direction
        def eval_predictions(self, output, batch, *, model) -> list[tuple[Any, Any]]: ...  # each worker
        def eval_metrics(self, pairs) -> dict[str, float]: ...  # rank 0, every eval row's pairs

`columns` maps task input names (`text`, `image`, ...) to lists of values as read; `labels` is one entry
per row (see Labels) or None. `encode` returns tensors, or lists/dicts of tensors (DETR's per-image
targets), moved to the worker's device recursively; keys starting with `_` are not model inputs but extras
for `eval_predictions` (answer offsets, image sizes, target texts; they stay on the CPU). `options` is
`train.options`: task-specific settings such as `label_all_tokens` or `packing`. The reported
`eval_accuracy` is the task's `eval_counts` hits/total summed over the eval set; by default
`argmax(logits, -1) == labels` over the positions where labels != -100 (sequence, token and next-token
accuracy alike). A task without `training` is refused with a SpecError naming the tasks that have it.

Task metrics. After each epoch every worker runs `eval_predictions(output, batch, *, model)` on its eval
batches (`batch` holds the model inputs and the `_` extras; `model` is the bare module, for `generate`): one
(prediction, reference) pair per eval row, in the shapes `models.metrics` consumes. The pairs are gathered
on rank 0, which calls `eval_metrics(pairs)` (a `models.metrics` function through `epoch_metrics`) and
broadcasts the result, so every rank's epoch record is the same (early stopping stops them together). The
record keys, `eval_<metric>`:
    text/image/audio classification  eval_macro_f1 (scikit-learn)
    token classification             eval_entity_precision / _recall / _f1 (seqeval, words' first sub-token)
    question answering               eval_exact_match, eval_f1 (SQuAD v1.1; the inference span search)
    speech recognition (CTC)         eval_wer, eval_cer (jiwer; greedy CTC decoding)
    object detection                 eval_map, eval_map_50 (pycocotools; the processor's post-process)
    image segmentation               eval_mean_iou, eval_pixel_accuracy (torchmetrics; ignore_index unscored)
    depth estimation                 eval_delta1, eval_abs_rel, eval_rmse (at the label's size)
    summarization                    eval_rouge1 / 2 / L (rouge-score; greedy generation, see below)
    translation                      eval_bleu (sacrebleu, 0-100), eval_chrf
    text generation                  eval_perplexity (exp of the mean token NLL; nothing is generated)
`eval_score` names the one that picks the published epoch ("min": lower is better, WER and perplexity;
`_score` negates it). Eval cost: only seq2seq generates, greedily and at most `max_target_length` new tokens
per row; the other tasks reuse the eval forward's outputs.

Data passing. Rows reach the workers as Ray datasets (`datasets={"train", "eval"}` +
`get_dataset_shard`), not in `train_loop_config`: the config is pickled into every worker, the object
store shares one copy per node; `streaming_split(equal=True)` gives equal step counts for DDP (below); the
same code works across nodes; and the datasets are lazy reads, so the driver never holds the rows (see
"Training data" below). Only "train" is split; each worker iterates all of "eval" and keeps the
rows with `row % world_size == rank`, so eval counts are exact (an equal split could drop rows).

Labels. A task's `training_labels` says what `train.label_column` holds:
- "class" (default): one class per row. `train.label_names` lists the classes in id order; when it is
  null they are the sorted distinct labels of the train and eval rows. String labels must be one of the
  names; integer labels are ids into `label_names` (the `datasets.ClassLabel` convention), or, with no
  names, are named by their value. `encode` gets class ids.
- "class_sequence": a list of classes per row (word-level NER tags); the same rules apply to every element
  and `encode` gets a list of ids per row.
- "raw": the values as read (a target text, SQuAD answers, COCO boxes, a mask): the task checks them;
  `train.label_names`, if set, reach `training` unchecked (e.g. the names of detection category ids);
  if not, a task with `training_label_names(values, *, options, key)` derives them from the targets of
  the train and eval rows (speech recognition: the CTC vocabulary of the transcripts): the pass calls it
  on each shard's targets, and the driver once more on the union of those names, so it must be idempotent
  on its own output (a sorted character set is).
- "none": no label column is read (causal LM on plain text); `encode` gets None.
A null label, or one outside the names, fails the job before training, naming the column and the values.

Batches. `train.batch_size` is the global batch (all workers, one optimizer step): each worker takes
`batch_size // num_workers` rows, so changing `num_workers` scales the job without changing the
optimization. Ray Data's `streaming_split(equal=True)` gives every worker the same number of rows, hence
the same number of DDP steps (a worker with one step more would wait forever in all-reduce); it may drop
up to `num_workers - 1` rows per epoch.

Output modes (`output.mode`). The output is a model folder, not shards, so:
- `resume` (default): refuse if a finished model is there (its manifest says so); otherwise continue an interrupted
  run of the same job from its last epoch checkpoint (Ray Train restores it when the run name and storage
  match; the run name carries a fingerprint of data, model and training settings, so a changed job starts
  from scratch instead of resuming someone else's state).
- `overwrite`: delete the files an earlier fine-tune published at `output.uri` (the ones its manifest lists,
  and this run's checkpoints) and train from scratch; the deleting happens after the data checks pass, so a
  typo does not cost the previous model. Nothing shardwise did not write is deleted: a folder holding other
  files, or an inference output, is refused (pipeline.commit ownership, pipeline.locations).
- `error-if-exists`: refuse if `output.uri` has any content.
Checkpoints go to `train.checkpoint_uri`, else `<output.uri>/_checkpoints` (removed once the model is
published; an explicit `checkpoint_uri` is left alone).

Ray Train version: ray 2.60 runs Train V2 unless `RAY_TRAIN_V2_ENABLED=0` (`ray/train/__init__.py`). This
module is written and tested against V2: the controller actor reserves no CPU, a rerun with the same
`RunConfig(name, storage_path)` restores the checkpoint manager (that is the resume above), and worker
failures arrive as `WorkerGroupError.worker_failures`. The APIs used (`TorchTrainer`, `ScalingConfig`,
`RunConfig`, `DataConfig`, `report`, `get_context`, `get_dataset_shard`, `get_checkpoint`) exist in V1 too,
which is untested here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import pyarrow as pa

from pipeline.bind import bind
from pipeline.commit import OutputDir
from pipeline.errors import JobFailed, ModelError, OutputError, ShardwiseError, SourceError, SpecError
from pipeline.execute import init_ray, new_run_id
from pipeline.lease import Lease
from pipeline.locations import check_output_location
from pipeline.redact import fingerprint_view, redact, scrub, secret_values
from pipeline.sources import input_schema, list_fragments, resolve_format
from pipeline.spec import FinetuneSpec, InputSpec, JobSpec, spec_to_dict

if TYPE_CHECKING:
    import torch

__all__ = ["FineTunable", "FinetuneResult", "Trainable", "model_inputs", "resolve_labels", "run_finetune"]

METRICS_FILE = "train_metrics.json"
CHECKPOINTS = "_checkpoints"
# In a checkpoint next to the HF files; never copied to the published model.
_TRAIN_STATE = "train_state.pt"
# Columns of the Ray datasets besides the task inputs (the `__` prefix keeps them apart from input names).
_LABEL = "__label"
_ROW = "__row"
# Same default as the HF Trainer (`max_grad_norm`): keeps the first steps on a fresh head from blowing up.
_MAX_GRAD_NORM = 1.0
# The score of a mid-epoch checkpoint: below any epoch's, so the best-epoch retention never keeps it
# (the latest checkpoint is always kept for a resume).
_NO_SCORE = -1e30
# Values of a bad label column quoted in an error message: enough to recognise the problem.
_QUOTE = 5


LabelMode = Literal["class", "class_sequence", "raw", "none"]
_LABEL_MODES = ("class", "class_sequence", "raw", "none")


class Trainable(Protocol):
    """The task-specific pieces of fine-tuning, built inside each Ray Train worker (optional members: the
    module docstring, "Task hooks" and "Task metrics")."""

    def build_model(self, weights_dir: str) -> torch.nn.Module: ...

    def encode(self, columns: Mapping[str, list[Any]], labels: list[Any] | None) -> dict[str, Any]: ...

    def save(self, model: torch.nn.Module, out_dir: str) -> None: ...


class FineTunable(Protocol):
    """A registered task that can be fine-tuned (`training_labels`, `training_text_inputs` optional)."""

    def training(
        self, base_dir: str, *, label_names: tuple[str, ...], max_length: int, options: Mapping[str, Any]
    ) -> Trainable: ...


def label_mode(task: Any) -> LabelMode:
    mode = getattr(task, "training_labels", "class")
    if mode not in _LABEL_MODES:
        raise ValueError(f"task {task.name!r}: training_labels must be one of {_LABEL_MODES}, got {mode!r}")
    return cast(LabelMode, mode)


def text_inputs(task: Any, inputs: Mapping[str, str]) -> dict[str, str]:
    """The stage's inputs that training needs as strings (all of them unless the task says otherwise)."""
    names = getattr(task, "training_text_inputs", None)
    return dict(inputs) if names is None else {k: v for k, v in inputs.items() if k in names}


@dataclass(frozen=True)
class FinetuneResult:
    output_uri: str
    epochs: int
    train_rows: int
    eval_rows: int
    label_names: tuple[str, ...]
    # One entry per epoch: {epoch, train_loss, eval_loss, eval_accuracy, the task's eval_<metric>s (see
    # "Task metrics"), epoch_s, score}; eval_* are None (task metrics absent) when there is no eval set.
    metrics: list[dict[str, Any]] = field(repr=False)
    wall_s: float


@dataclass(frozen=True)
class _LoopConfig:
    """What every worker needs; small (the rows travel as Ray datasets, not in here)."""

    task: str
    base_model: str
    input_names: tuple[str, ...]
    label_names: tuple[str, ...]
    has_labels: bool
    train: FinetuneSpec
    train_rows: int
    has_eval: bool
    threads: int
    # Training rows per class in id order (class / class_sequence labels), from the streaming pass.
    label_counts: tuple[int, ...] = ()
    # train.class_weights: balanced → one weight per class (n_rows / (n_classes × rows of the class)).
    class_weights: tuple[float, ...] | None = None


# -------------------------------------------------------------------------------------------------------
# Labels and data (driver)


def resolve_labels(
    values: pa.ChunkedArray | pa.Array,
    *,
    label_names: tuple[str, ...] | None,
    column: str,
    row_ids: Sequence[str],
) -> tuple[tuple[str, ...], list[int]]:
    """(label names in id order, the id of every row); raises SpecError naming the column and the values.

    The in-memory form of what a fine-tune does in two steps: the streaming pass summarises each shard's
    labels (`_class_summary`), the driver names the classes from the merged counts (`_label_names`), and
    the read tasks turn labels into ids (`_label_ids`)."""
    summary = _class_summary(values, list(row_ids), [False] * len(values))
    tally = _LabelTally()
    tally.add(0, summary)
    names, keys = tally.names(label_names=label_names, column=column)
    return names, _label_ids(values, "class", keys).to_pylist()


def _counts(values: Any) -> str:
    """`'posit' (3 rows), 7 (1 row)`: the first few bad values, each with its number of rows."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return _quote_counts(counts)


def _quote_counts(counts: Mapping[Any, int]) -> str:
    """`_counts` from counts already made (in order of first appearance: ties keep it)."""
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{v!r} ({n} row{'s' if n > 1 else ''})" for v, n in items[:_QUOTE])
    return text + (f" and {len(items) - _QUOTE} more" if len(items) > _QUOTE else "")


# -------------------------------------------------------------------------------------------------------
# Training data: planned shards read by Ray Data tasks (never by the driver)
#
#   driver   list the files, plan row-range shards (file metadata only: pipeline.plan)
#          → streaming pass: from_items(shards) → map_batches(_summarise): each task reads its shard with
#            `read_shard` (the inference path's reader and checks) and returns one small summary (row
#            counts per side, parse errors, null counts with a few row ids, label value counts); the driver
#            merges summaries as they arrive and raises the data errors, still before anything is written
#          → label names (sorted distinct, or train.label_names) and their ids, per-class counts
#          → train / eval datasets: from_items(shards) → map_batches(_training_rows): read the shard again,
#            keep its side's rows, labels → ids, (train) shuffle within the shard; lazy, executed by Ray
#            Train's ingest (the train split) and by each worker (eval)
#
# The eval split needs no shared state: a row is an eval row when a hash of its id keyed by train.seed is
# below eval_fraction, so both reads agree, reruns agree, and train and eval never share a row.

# Labels a classifier may have before the label column is taken for something else (a text column).
_MAX_CLASSES = 100_000
# max_train_rows reads a prefix of the input (as the cap needs); the split's share varies around
# eval_fraction, so the prefix has this much slack before the train rows are cut exactly.
_CAP_SLACK = 1.1


@dataclass(frozen=True)
class _Source:
    """One input as its read tasks see it (small: it travels to every task)."""

    spec: InputSpec
    # "train": every row trains; "eval": every row evaluates (train.eval_input); "split": a row evaluates
    # when the hash of its id falls in eval_fraction (`_eval_mask`).
    role: Literal["train", "eval", "split"]
    columns: tuple[str, ...]  # what to read: input columns, the label column, the id column
    inputs: dict[str, str]  # task input name → column
    texts: tuple[str, ...]  # the inputs that must be strings
    mode: LabelMode
    label_column: str | None  # None for mode "none"
    seed: int
    eval_fraction: float
    # Raw labels named by the task's `training_label_names` (per shard, then over the union on the driver).
    derive: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Data:
    """What the driver holds of the training data: plans and small summaries, never rows."""

    # Shard items (`_items`) of the training rows, in a seeded order, each with its train-row quota.
    train: Any
    eval: Any  # shard items of the eval rows, or None (no eval set)
    label_names: tuple[str, ...]
    listing: list[Any]  # what identifies the data, for the run fingerprint
    train_source: _Source | None = None
    eval_source: _Source | None = None
    # Label → id rule for the read tasks: ids are positions in `keys` (class names, or integer labels).
    keys: tuple[Any, ...] = ()
    # Training rows per class, in id order (class and class_sequence labels; per tag for sequences).
    label_counts: tuple[int, ...] = ()
    train_rows: int = 0
    eval_rows: int = 0


def _eval_mask(ids: Sequence[str], *, seed: int, fraction: float) -> Any:
    """(rows,) bool: the rows of a split input that evaluate. blake2b of the id keyed by the seed: stable
    across processes and machines (Python's hash() is not), and independent of which shard a row is in."""
    import numpy as np

    key = str(seed).encode()
    cut = int(fraction * 2**64)
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=key).digest(), "little") < cut
            for i in ids
        ),
        dtype=bool,
        count=len(ids),
    )


def _read_item(item: Mapping[str, Any], source: _Source) -> tuple[pa.Table, Any]:
    """One planned shard's rows (`read_shard`: the file must still be the planned one) and its eval mask."""
    import numpy as np

    from pipeline.plan import Shard
    from pipeline.sources import read_shard

    shard = Shard.from_dict(json.loads(item["shard"]))
    table = read_shard(source.spec, shard.fragment, shard.start, shard.stop, columns=list(source.columns))
    if source.role == "split":
        mask = _eval_mask(table.column("__id").to_pylist(), seed=source.seed, fraction=source.eval_fraction)
    else:
        mask = np.full(table.num_rows, source.role == "eval")
    return table, mask


def _null_ids(column: pa.ChunkedArray | pa.Array, ids: pa.ChunkedArray | pa.Array) -> list[str]:
    import pyarrow.compute as pc

    return ids.filter(pc.is_null(column)).slice(0, _QUOTE).to_pylist()


def _class_summary(values: pa.ChunkedArray | pa.Array, ids: list[str], is_eval: Sequence[bool]) -> dict:
    """One shard's class labels: type kind, nulls (count, first row ids), [value, train rows, eval rows]."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    t = values.type
    kind = (
        "int"
        if pa.types.is_integer(t)
        else "str"
        if pa.types.is_string(t) or pa.types.is_large_string(t)
        else "null"
        if pa.types.is_null(t)
        else "bad"
    )
    summary: dict[str, Any] = {"type": str(t), "kind": kind, "nulls": values.null_count, "null_ids": []}
    if kind == "bad":
        return summary
    counts: dict[Any, list[int]] = {}
    nulls = []
    for v, row_id, ev in zip(values.to_pylist(), ids, is_eval, strict=True):
        if v is None:
            if len(nulls) < _QUOTE:
                nulls.append(row_id)
            continue
        c = counts.setdefault(v, [0, 0])
        c[1 if ev else 0] += 1
    summary["null_ids"] = nulls
    summary["counts"] = [[v, tr, ev] for v, (tr, ev) in counts.items()]
    return summary


def _summarise(batch: pa.Table, *, sources: Sequence[_Source]) -> pa.Table:
    """Streaming pass (a Ray Data task): read each shard of the block and summarise it (JSON, one row)."""
    import numpy as np
    import pyarrow.compute as pc

    out = []
    for item in batch.to_pylist():
        source = sources[item["source"]]
        table, is_eval = _read_item(item, source)
        ids = table.column("__id")
        errors = table.column("__read_error").drop_null()
        summary: dict[str, Any] = {
            "pos": item["pos"],
            "source": item["source"],
            "rows": table.num_rows,
            "eval": int(is_eval.sum()),
            "read_errors": len(errors),
            "read_error": errors[0].as_py() if len(errors) else None,
            "inputs": {},
        }
        summary["train"] = table.num_rows - summary["eval"]
        for name, col in source.inputs.items():
            column = table.column(col)
            t = column.type
            text = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            summary["inputs"][name] = {
                "type": str(t),
                "text_ok": name not in source.texts or text,
                "nulls": column.null_count,
                "null_ids": _null_ids(column, ids) if column.null_count else [],
            }
        if source.mode != "none":
            assert source.label_column is not None
            labels = table.column(source.label_column).combine_chunks()
            id_list = ids.to_pylist()
            if source.mode == "class":
                summary["label"] = _class_summary(labels, id_list, is_eval.tolist())
            elif source.mode == "class_sequence":
                seq: dict[str, Any] = {
                    "type": str(labels.type),
                    "kind": "list"
                    if pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type)
                    else "null"
                    if pa.types.is_null(labels.type)
                    else "bad",
                    "nulls": labels.null_count,
                    "null_ids": _null_ids(labels, ids) if labels.null_count else [],
                }
                if seq["kind"] == "list":
                    lengths = pc.list_value_length(labels).fill_null(0).to_numpy(zero_copy_only=False)
                    rows = np.repeat(np.arange(len(labels)), lengths)
                    seq["elements"] = _class_summary(
                        pc.list_flatten(labels),
                        [id_list[i] for i in rows],
                        is_eval[rows].tolist(),
                    )
                summary["label"] = seq
            else:  # raw
                raw: dict[str, Any] = {
                    "nulls": labels.null_count,
                    "null_ids": _null_ids(labels, ids) if labels.null_count else [],
                }
                if source.derive is not None:
                    raw["names"] = _derive_names(labels.drop_null().to_pylist(), source)
                summary["label"] = raw
        out.append(json.dumps(summary, default=str))
    return pa.table({"summary": pa.array(out, pa.string())})


def _derive_names(values: list[Any], source: _Source) -> list[str]:
    """The task's names for one shard's raw targets (e.g. the characters of its transcripts). The driver
    takes the union and passes it through the hook once more, so the hook must be idempotent on its own
    names (a sorted character set is). A shard of string targets that yields none (all transcripts empty)
    contributes none: the driver's final call decides whether the whole input has none."""
    from models.registry import get_task

    derive = get_task(source.derive or "").training_label_names
    try:
        return list(derive(values, options=dict(source.options), key="train.label_column"))
    except SpecError:
        if values and all(isinstance(v, str) for v in values):
            return []
        raise


def _keep_first(kept: list[tuple[int, int, str]], pos: int, ids: Sequence[str]) -> None:
    """The first `_QUOTE` row ids in plan order, from shards that arrive in any order."""
    kept.extend((pos, i, row_id) for i, row_id in enumerate(ids))
    kept.sort()
    del kept[_QUOTE:]


class _LabelTally:
    """Class labels merged over shards: kinds (with the first shard of each), nulls, value counts."""

    def __init__(self) -> None:
        self.kinds: dict[str, tuple[int, str]] = {}  # kind → (first pos, type)
        self.nulls = 0
        self.null_ids: list[tuple[int, int, str]] = []
        self.counts: dict[Any, list[int]] = {}  # value → [train rows, eval rows]
        self.first: dict[Any, tuple[int, int]] = {}  # value → (pos, index): ties in messages keep data order

    def add(self, pos: int, s: Mapping[str, Any], *, column: str = "") -> None:
        kind = s["kind"]
        if kind not in self.kinds or pos < self.kinds[kind][0]:
            self.kinds[kind] = (pos, s["type"])
        self.nulls += s["nulls"]
        _keep_first(self.null_ids, pos, s["null_ids"])
        for i, (v, tr, ev) in enumerate(s.get("counts", ())):
            c = self.counts.get(v)
            if c is None:
                if len(self.counts) >= _MAX_CLASSES:
                    raise SpecError(
                        "train.label_column",
                        f"column {column!r} has more than {_MAX_CLASSES} distinct labels; a classifier's labels "
                        "are a few classes. Point train.label_column at the label column",
                    )
                c = self.counts[v] = [0, 0]
                self.first[v] = (pos, i)
            elif (pos, i) < self.first[v]:
                self.first[v] = (pos, i)
            c[0] += tr
            c[1] += ev

    def names(
        self, *, label_names: tuple[str, ...] | None, column: str
    ) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        """(label names in id order, keys: the label value of each id) — or the SpecError of the labels."""
        if "bad" in self.kinds:
            raise SpecError(
                "train.label_column",
                f"column {column!r} has type {self.kinds['bad'][1]}; labels must be strings (class names) or "
                "integers (class ids). Point train.label_column at the label column or convert it",
            )
        if "int" in self.kinds and "str" in self.kinds:
            raise SpecError(
                "train.label_column",
                f"column {column!r} holds integers ({self.kinds['int'][1]}) in some rows and strings in others; "
                "labels must be all class names or all class ids. Convert the column",
            )
        if self.nulls:
            raise SpecError(
                "train.label_column",
                f"column {column!r} has {self.nulls} null label(s) (row ids {[r for *_, r in self.null_ids]}); "
                "every training and eval row needs a label. Drop or fill those rows, or point "
                "train.label_column at another column",
            )
        ordered = sorted(self.counts, key=lambda v: self.first[v])  # first appearance, in plan order
        rows = {v: self.counts[v][0] + self.counts[v][1] for v in ordered}
        is_int = "int" in self.kinds
        if label_names is not None:
            if len(set(label_names)) != len(label_names):
                dupes = sorted({n for n in label_names if label_names.count(n) > 1})
                raise SpecError("train.label_names", f"names must be distinct, {dupes} appear more than once")
            if is_int:
                ok = set(range(len(label_names)))
                bad = {v: n for v, n in rows.items() if v not in ok}
                if bad:
                    raise SpecError(
                        "train.label_names",
                        f"column {column!r} holds integer labels, which are ids into train.label_names "
                        f"(0..{len(label_names) - 1} for {list(label_names)}), but has {_quote_counts(bad)}. "
                        "Fix the labels, list a name for every id, or leave train.label_names unset to name the "
                        "classes by their values",
                    )
                return label_names, tuple(range(len(label_names)))
            bad = {v: n for v, n in rows.items() if v not in set(label_names)}
            if bad:
                raise SpecError(
                    "train.label_names",
                    f"column {column!r} has labels that are not in train.label_names {list(label_names)}: "
                    f"{_quote_counts(bad)}. Fix the data, add those names to train.label_names, or leave it "
                    "unset to use the sorted distinct labels of the data",
                )
            return label_names, label_names
        distinct = sorted(rows)
        if len(distinct) < 2:
            raise SpecError(
                "train.label_column",
                f"column {column!r} has {len(distinct)} distinct label(s) {distinct}; a classifier needs at "
                "least 2. Check train.label_column, or set train.label_names to list every class",
            )
        return tuple(str(v) for v in distinct), tuple(distinct)

    def train_counts(self, keys: Sequence[Any]) -> tuple[int, ...]:
        return tuple(self.counts.get(k, [0, 0])[0] for k in keys)


class _SourceTally:
    """One input's summaries merged: rows per side, parse errors, the inputs' types and nulls."""

    def __init__(self) -> None:
        self.rows = self.train = self.eval = 0
        self.by_pos: dict[int, tuple[int, int]] = {}  # (train rows, eval rows) of each shard
        self.read_errors = 0
        self.read_error: tuple[int, str] | None = None
        self.bad_type: dict[str, tuple[int, str]] = {}  # input → (first pos, type)
        self.nulls: dict[str, int] = {}
        self.null_ids: dict[str, list[tuple[int, int, str]]] = {}

    def add(self, s: Mapping[str, Any]) -> None:
        pos = s["pos"]
        self.rows += s["rows"]
        self.train += s["train"]
        self.eval += s["eval"]
        self.by_pos[pos] = (s["train"], s["eval"])
        self.read_errors += s["read_errors"]
        if s["read_error"] is not None and (self.read_error is None or pos < self.read_error[0]):
            self.read_error = (pos, s["read_error"])
        for name, info in s["inputs"].items():
            if not info["text_ok"] and (name not in self.bad_type or pos < self.bad_type[name][0]):
                self.bad_type[name] = (pos, info["type"])
            self.nulls[name] = self.nulls.get(name, 0) + info["nulls"]
            _keep_first(self.null_ids.setdefault(name, []), pos, info["null_ids"])

    def check(self, source: _Source) -> None:
        """The errors of the old in-driver read, with the same messages (tests/jobs/test_finetune.py)."""
        uri = source.spec.uri
        if self.read_errors:
            assert self.read_error is not None
            raise SourceError(
                f"{self.read_errors} row(s) of {uri!r} could not be parsed (e.g. {self.read_error[1]}); "
                "training needs every row. Fix or remove those lines"
            )
        for name, col in source.inputs.items():
            if name in self.bad_type:
                raise SpecError(
                    f"stages[0].inputs.{name}",
                    f"column {col!r} of {uri} has type {self.bad_type[name][1]}; input {name!r} must be text",
                )
            if self.nulls.get(name):
                ids = [r for *_, r in self.null_ids[name]]
                raise SpecError(
                    f"stages[0].inputs.{name}",
                    f"column {col!r} of {uri} has {self.nulls[name]} null value(s) (row ids {ids}); every "
                    f"training row needs its {name!r}. Drop or fill those rows",
                )


class _Tally:
    """The streaming pass's result: every summary merged on arrival (the driver keeps no per-row state)."""

    def __init__(self, sources: Sequence[_Source], *, mode: LabelMode, column: str) -> None:
        self.sources = [_SourceTally() for _ in sources]
        self.mode, self.column = mode, column
        self.labels = _LabelTally()  # class labels, or the elements of class_sequence labels
        self.kinds: dict[str, tuple[int, str]] = {}  # class_sequence: list | null | bad → (first pos, type)
        self.nulls = 0  # null lists (class_sequence) or null targets (raw)
        self.null_ids: list[tuple[int, int, str]] = []
        self.derived: set[str] = set()  # raw: the union of the task's names per shard

    def add(self, s: Mapping[str, Any]) -> None:
        self.sources[s["source"]].add(s)
        label, pos = s.get("label"), s["pos"]
        if label is None:
            return
        if self.mode == "class":
            self.labels.add(pos, label, column=self.column)
            return
        if self.mode == "class_sequence":
            kind = label["kind"]
            if kind not in self.kinds or pos < self.kinds[kind][0]:
                self.kinds[kind] = (pos, label["type"])
            if "elements" in label:
                self.labels.add(pos, label["elements"], column=self.column)
        self.nulls += label["nulls"]
        _keep_first(self.null_ids, pos, label["null_ids"])
        self.derived.update(label.get("names", ()))


def _label_ids(values: pa.ChunkedArray | pa.Array, mode: LabelMode, keys: Sequence[Any]) -> pa.Array:
    """Labels → ids (read tasks): the position of each label in `keys`; lists of labels → lists of ids;
    raw targets as they are. The streaming pass has checked that every label has a key."""
    import numpy as np
    import pyarrow.compute as pc

    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if mode == "raw":
        return values
    if mode == "class_sequence":
        ids = _label_ids(pc.list_flatten(values), "class", keys)
        lengths = pc.list_value_length(values).fill_null(0).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), ids)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    kind = pa.int64() if keys and isinstance(keys[0], int) else pa.string()
    found = pc.index_in(values.cast(kind), value_set=pa.array(list(keys), kind))
    return found.cast(pa.int64())


def _training_rows(
    batch: pa.Table, *, source: _Source, side: Literal["train", "eval"], keys: Sequence[Any]
) -> pa.Table:
    """Read task of the train/eval datasets: each shard's rows of `side`, as `_train_loop` takes them
    (task input names, `__label` ids; eval rows a `__row` unique over the eval set: file index · 2^32 + row
    in file; train rows shuffled within the shard, seeded)."""
    import numpy as np

    tables = []
    for item in batch.to_pylist():
        table, is_eval = _read_item(item, source)
        keep = np.flatnonzero(is_eval if side == "eval" else ~is_eval)
        if item["quota"] >= 0:  # train.max_train_rows: this shard's share of the cap
            keep = keep[: item["quota"]]
        if side == "train":
            keep = np.random.default_rng([source.seed, item["pos"]]).permutation(keep)
        rows = table.take(pa.array(keep, pa.int64()))
        cols: dict[str, Any] = {name: rows.column(col) for name, col in source.inputs.items()}
        if source.mode != "none":
            assert source.label_column is not None
            cols[_LABEL] = _label_ids(rows.column(source.label_column), source.mode, keys)
        if side == "eval":
            in_file = rows.column("__row").to_numpy().astype(np.int64)
            cols[_ROW] = pa.array(item["file"] * 2**32 + in_file, pa.int64())
        tables.append(pa.table(cols))
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _lazy(ray: Any, items: list[dict[str, Any]], fn: Callable[..., pa.Table], **kwargs: Any) -> Any:
    """from_items(shard items, one block each) → map_batches(fn): reads run in Ray Data tasks."""
    import logging

    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # A copy, current only while the dataset is built (a Dataset seals the context it was created under).
    ctx = DataContext.get_current().copy()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    with DataContext.current(ctx):
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        return ds.map_batches(fn, batch_size=None, batch_format="pyarrow", fn_kwargs=kwargs)


def _dataset(ray: Any, data: _Data, side: Literal["train", "eval"]) -> Any:
    source = data.train_source if side == "train" else data.eval_source
    items = data.train if side == "train" else data.eval
    return _lazy(ray, items, _training_rows, source=source, side=side, keys=data.keys)


def _shardwise_cause(exc: BaseException) -> ShardwiseError | None:
    """A ShardwiseError raised in a Ray Data task, inside Ray's wrappers (UserCodeException, RayTaskError)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ShardwiseError):
            return e
        todo.extend(
            c for c in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(c, BaseException)
        )
    return None


def _scan(ray: Any, items: list[dict[str, Any]], tally: _Tally, sources: Sequence[_Source]) -> None:
    """The streaming pass: summaries arrive one block (shard) at a time and are merged at once."""
    ds = _lazy(ray, items, _summarise, sources=list(sources))
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for text in batch.column("summary").to_pylist():
                tally.add(json.loads(text))
    except ShardwiseError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps the read task's error; report the cause
        cause = _shardwise_cause(e)
        if cause is not None:
            raise cause from None
        raise SourceError(
            f"reading the training data failed: {type(e).__name__}: {e}. Check the input files"
        ) from e


def _check_schema(source: _Source, fragments: Sequence[Any], columns: Mapping[str, str]) -> None:
    """A missing column is a SpecError naming its key, from the first file's schema (metadata only; the read
    tasks check every file)."""
    if not fragments or source.spec.resolved_format() == "jsonl":  # jsonl: read_range checks parsed keys
        return
    names = input_schema(source.spec, fragments[0]).names
    for col, key in columns.items():
        if col not in names:
            raise SpecError(key, f"column {col!r} is not in {source.spec.uri!r}; its columns: {names}")


def _plan_items(
    spec: JobSpec, source: _Source, fragments: list[Any], *, index: int, first: int
) -> list[dict[str, Any]]:
    """The source's shards (pipeline.plan, as inference cuts them) as from_items rows: the shard, its
    source, its position over all sources (`pos`: plan order), its file's index, a train-row quota."""
    from pipeline.plan import plan_shards

    shards = plan_shards(dataclasses.replace(spec, input=source.spec), fragments)
    files = {f.rel: i for i, f in enumerate(fragments)}
    return [
        {
            "shard": json.dumps(s.to_dict()),
            "source": index,
            "pos": first + k,
            "file": files[s.fragment.rel],
            "quota": -1,
        }
        for k, s in enumerate(shards)
    ]


def _prepare_data(spec: JobSpec) -> _Data:
    """Plan the rows, check them and name the labels with a streaming pass on Ray (running already), and
    split train/eval by row-id hash. The driver holds plans and summaries, never rows."""
    import numpy as np
    import ray

    from models.registry import get_task

    t = spec.train
    assert t is not None
    task = get_task(spec.stage.task)
    mode = label_mode(task)
    inputs = spec.stage.inputs
    texts = text_inputs(task, inputs)
    columns = {col: f"stages[0].inputs.{name}" for name, col in inputs.items()}
    if mode != "none":
        columns.setdefault(t.label_column, "train.label_column")
    if spec.input.id_column:  # read_range builds row ids (used in error messages) from it
        columns.setdefault(spec.input.id_column, "input.id_column")
    split = t.eval_input is None and t.eval_fraction > 0
    derive = getattr(task, "training_label_names", None)
    derive_task = spec.stage.task if mode == "raw" and not t.label_names and callable(derive) else None

    def source(ispec: InputSpec, role: Literal["train", "eval", "split"]) -> _Source:
        return _Source(
            spec=ispec,
            role=role,
            columns=tuple(columns),
            inputs=dict(inputs),
            texts=tuple(texts),
            mode=mode,
            label_column=t.label_column if mode != "none" else None,
            seed=t.seed,
            eval_fraction=t.eval_fraction,
            derive=derive_task,
            options=dict(t.options),
        )

    train_spec = spec.input
    if t.max_train_rows is not None:
        # Read only what the cap needs: with a split, enough rows that the train part still reaches it
        # (the cap itself is exact: per-shard quotas from the pass's counts, below).
        need = (
            math.ceil(t.max_train_rows * _CAP_SLACK / (1 - t.eval_fraction)) + 16
            if split
            else t.max_train_rows
        )
        train_spec = dataclasses.replace(train_spec, limit=min(train_spec.limit or need, need))
    sources = [source(train_spec, "split" if split else "train")]
    fragments = [list_fragments(spec.input)]
    if t.eval_input is not None:
        sources.append(source(t.eval_input, "eval"))
        fragments.append(list_fragments(t.eval_input))
    for src, frags in zip(sources, fragments, strict=True):
        _check_schema(src, frags, columns)
    plans: list[list[dict[str, Any]]] = []
    for i, (src, frags) in enumerate(zip(sources, fragments, strict=True)):
        plans.append(_plan_items(spec, src, frags, index=i, first=sum(len(p) for p in plans)))

    tally = _Tally(sources, mode=mode, column=t.label_column)
    every = [item for plan in plans for item in plan]
    if every:
        _scan(ray, every, tally, sources)
    for src, st in zip(sources, tally.sources, strict=True):
        st.check(src)
    train_tally = tally.sources[0]
    if train_tally.rows == 0:
        raise SourceError(f"input.uri {spec.input.uri!r} has no rows to train on")

    names, keys, counts = _labels(tally, t, task)
    if split and train_tally.train == 0:
        raise SpecError("train.eval_fraction", f"leaves no training rows out of {train_tally.rows}; lower it")

    # Train items: shards with training rows; max_train_rows becomes exact per-shard quotas, in plan order.
    train_items = [it for it in plans[0] if train_tally.by_pos[it["pos"]][0] > 0]
    if t.max_train_rows is not None:
        left = t.max_train_rows
        for it in train_items:
            it["quota"] = min(train_tally.by_pos[it["pos"]][0], left)
            left -= it["quota"]
        train_items = [it for it in train_items if it["quota"] > 0]
    train_rows = sum(
        it["quota"] if it["quota"] >= 0 else train_tally.by_pos[it["pos"]][0] for it in train_items
    )
    # Shards in a seeded order, so that label-sorted inputs do not reach the workers in long runs of one
    # class; each shard is shuffled in its read task, and each epoch adds a local shuffle on top.
    order = np.random.default_rng(t.seed).permutation(len(train_items))
    train_items = [train_items[i] for i in order]
    eval_tally = tally.sources[-1]
    eval_items = [it for it in plans[-1] if eval_tally.by_pos[it["pos"]][1] > 0]
    eval_rows = eval_tally.eval
    listing = [[f.rel, f.size, f.version] for f in fragments[0]]
    if t.eval_input is not None:
        listing.append([[f.rel, f.size, f.version] for f in fragments[1]])
    return _Data(
        train=train_items,
        eval=eval_items if eval_rows else None,
        label_names=names,
        listing=listing,
        train_source=sources[0],
        eval_source=sources[-1] if eval_rows else None,
        keys=keys,
        label_counts=counts,
        train_rows=train_rows,
        eval_rows=eval_rows,
    )


def _labels(
    tally: _Tally, t: FinetuneSpec, task: Any
) -> tuple[tuple[str, ...], tuple[Any, ...], tuple[int, ...]]:
    """(label names, keys for `_label_ids`, training rows per class) from the pass, or the labels' error."""
    col = t.label_column
    if tally.mode == "none":
        return (), (), ()
    if tally.mode == "class_sequence":
        bad = tally.kinds.get("bad") or (None if "list" in tally.kinds else tally.kinds.get("null"))
        if bad is not None:
            raise SpecError(
                "train.label_column",
                f"column {col!r} has type {bad[1]}; this task needs a list of labels per row (e.g. one tag "
                "per word). Point train.label_column at such a column",
            )
        if tally.nulls:
            raise SpecError(
                "train.label_column",
                f"column {col!r} has {tally.nulls} null list(s) (row ids {[r for *_, r in tally.null_ids]}); "
                "every training row needs its labels. Drop or fill those rows",
            )
    if tally.mode in ("class", "class_sequence"):
        names, keys = tally.labels.names(label_names=t.label_names, column=col)
        return names, keys, tally.labels.train_counts(keys)
    if tally.nulls:  # raw
        raise SpecError(
            "train.label_column",
            f"column {col!r} has {tally.nulls} null value(s) (row ids {[r for *_, r in tally.null_ids]}); "
            "every training row needs its target. Drop or fill those rows",
        )
    # Raw targets may still index named classes (detection category ids): pass the names through.
    names = tuple(t.label_names or ())
    derive = getattr(task, "training_label_names", None)
    if not names and callable(derive):
        # Or the task names its outputs after the targets (a CTC vocabulary: the transcripts' characters):
        # its names of each shard, merged, through the hook once more (which also judges an empty union).
        names = tuple(derive(sorted(tally.derived), options=dict(t.options), key="train.label_column"))
    return names, (), ()


# -------------------------------------------------------------------------------------------------------
# Output location (driver)


def _check_locations(spec: JobSpec) -> None:
    """The output and checkpoint folders must be safe places to write (and, on overwrite, delete) in."""
    assert spec.train is not None
    protected = [("input.uri", spec.input.uri), ("stages[0].model", spec.stage.model)]
    if spec.train.eval_input is not None:
        protected.append(("train.eval_input.uri", spec.train.eval_input.uri))
    check_output_location(spec.output.uri, key="output.uri", protected=protected)
    if spec.train.checkpoint_uri is not None:
        check_output_location(spec.train.checkpoint_uri, key="train.checkpoint_uri", protected=protected)


def _check_output(spec: JobSpec, out: OutputDir, *, delete: bool) -> dict[str, Any] | None:
    """Refuse what output.mode forbids; returns the manifest of an earlier run. `delete=False` only checks:
    `overwrite` clears the output only once the data and labels have passed their checks, so a job with a
    typo does not destroy the previous model."""
    manifest = out.claim(kind="finetune", mode=spec.output.mode, delete=delete)
    if spec.output.mode != "overwrite" and manifest is not None and manifest.get("state") == "succeeded":
        raise OutputError(
            f"output.uri {spec.output.uri!r} already holds a finished fine-tuned model ({manifest.get('name')!r}); "
            "use it as an inference `model`, or set output.mode to 'overwrite' (or pass --overwrite) to "
            "train again, or write to another output.uri"
        )
    return manifest


def _clear_checkpoints(run_dir: str, storage_options: dict[str, Any]) -> None:
    """`overwrite`: remove this run's old checkpoints (which Ray Train would resume)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_dir, **storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _finetune_manifest(
    spec: JobSpec, *, state: str, fingerprint: str, run_id: str, files: list[str], reason: str | None = None
) -> dict[str, Any]:
    """The fine-tune output's manifest: marks the folder as shardwise's (and lists the model files it wrote,
    the only ones an overwrite may delete), and gives `shardwise status` its state."""
    from pipeline import __version__

    return {
        "format": 2,
        "shardwise": __version__,
        "kind": "finetune",
        "name": spec.name,
        "state": state,
        "reason": reason,
        "fingerprint": fingerprint,
        "run_id": run_id,
        "spec": redact(spec_to_dict(spec)),
        "files": sorted(files),
        "updated_at": time.time(),
    }


def _storage(uri: str, storage_options: dict[str, Any]) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: any fsspec URI, through pyarrow's fsspec bridge."""
    if "://" not in uri or uri.startswith("file://"):
        # Absolute: Ray Train workers run in their own working directory.
        return str(Path(uri.removeprefix("file://")).expanduser().resolve()), None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    return root, PyFileSystem(FSSpecHandler(fs))


def _publish(
    checkpoint: Any,
    out: OutputDir,
    *,
    metrics: dict[str, Any],
    manifest: Callable[[list[str]], None],
    prepare: Callable[[str], None] | None = None,
) -> None:
    """Copy the final checkpoint's model files into the output folder (the caller writes `_SUCCESS` last).
    `prepare` edits the staged copy first (LoRA with `merge: true`: the adapter → the merged model).

    The files are staged first (a hidden folder inside the output on local disks, so each file is then one
    rename; a local temp folder for object stores, then one PUT per file): readers never see a partial
    file, and `_SUCCESS` says the folder is complete.
    """
    out.clear_success()
    local = out._is_local()
    if local:
        out.fs.makedirs(out.root, exist_ok=True)
    stage = (
        out.path(f".staging-{uuid.uuid4().hex[:8]}") if local else tempfile.mkdtemp(prefix="shardwise-model-")
    )
    try:
        checkpoint.to_directory(stage)
        Path(stage, _TRAIN_STATE).unlink(missing_ok=True)
        if prepare is not None:
            prepare(stage)
        Path(stage, METRICS_FILE).write_text(json.dumps(metrics, indent=1, sort_keys=True, default=str))
        # The manifest lists the files before they appear: a crash mid-publish leaves only files it owns.
        manifest(sorted(p.relative_to(stage).as_posix() for p in Path(stage).rglob("*") if p.is_file()))
        for path in sorted(Path(stage).rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(stage).as_posix()
            if local:
                os.makedirs(posixpath.dirname(out.path(rel)), exist_ok=True)
                os.replace(path, out.path(rel))
            else:
                out.fs.put_file(str(path), out.path(rel))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# -------------------------------------------------------------------------------------------------------
# Driver


def _merge_lora(
    folder: str, *, task: str, base: str, label_names: tuple[str, ...], train: FinetuneSpec
) -> None:
    """`train.lora.merge: true`: checkpoints hold the adapter (resumable, small); the published
    folder is the base with it merged in, built and saved by the task's trainable as in a full fine-tune."""
    from models.loading import resolve_model
    from models.lora import merge_lora
    from models.registry import get_task

    base_dir = resolve_model(base)
    trainable = cast(FineTunable, get_task(task)).training(
        base_dir, label_names=label_names, max_length=train.max_length, options=dict(train.options)
    )
    merge_lora(folder, trainable=trainable, base_dir=base_dir)


def _check_base_model(base: str, uri: str) -> None:
    """A folder without a loadable config fails here, with the fix, not in every worker after Ray started."""
    from transformers import AutoConfig

    from models.lora import is_adapter_folder

    if is_adapter_folder(base):
        raise ModelError(
            f"stages[0].model {uri!r} is a LoRA adapter folder (adapter_config.json), which cannot be trained "
            "further as a base model; fine-tune its base model instead, or a merged model (train.lora.merge: "
            "true writes one)"
        )

    try:
        AutoConfig.from_pretrained(base)
    except Exception as e:  # noqa: BLE001 - HF raises OSError/ValueError/KeyError for the same mistake
        raise ModelError(
            f"stages[0].model {uri!r} cannot be loaded as a base model ({type(e).__name__}: {e}); point it at a "
            "folder with config.json, *.safetensors and tokenizer files (e.g. python -m infra.assets fetch "
            "prints the MiniLM folder)"
        ) from e


def _fingerprint(spec: JobSpec, data: _Data, model_id: Any) -> str:
    """Identifies a training run for resume: data, base model, task, labels and the settings that change the
    result. Scaling (num_workers, use_gpu) and where checkpoints go are left out: a run may resume on another
    cluster shape."""
    assert spec.train is not None
    train = {
        k: v
        for k, v in fingerprint_view(spec_to_dict(spec.train)).items()
        if k not in ("num_workers", "use_gpu", "checkpoint_uri")
    }
    parts = {
        "task": spec.stage.task,
        "inputs": spec.stage.inputs,
        "model": model_id,
        # Non-secret storage options as a digest: a rotated key resumes the same run, no secret is hashed.
        "input": fingerprint_view(spec_to_dict(spec.input)),
        "data": data.listing,
        "labels": data.label_names,
        "train": train,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _run_name(spec: JobSpec, fp: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in spec.name)[:40]
    return f"{slug}-{fp[:12]}"


def _embedded_cpus(num_workers: int) -> int:
    """Logical CPUs for the embedded cluster.

    Each Train worker reserves 1 CPU and Ray Train waits, without end, until all of them fit; the V2
    controller and Ray Data's split coordinator reserve none (seen with ray 2.60: 2 workers train on exactly
    2 logical CPUs; 1 CPU for 2 workers never starts, which `_check_cluster` turns into an error). The
    datasets' read tasks need the spare CPU: they would otherwise wait forever behind the workers. Logical CPUs may exceed the cores;
    torch threads are set per worker.
    """
    return max(os.cpu_count() or 1, num_workers + 1)


def _check_cluster(t: FinetuneSpec) -> None:
    """Fail now, not hang in placement, when the cluster cannot hold the workers (e.g. a reused small one)."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": t.num_workers, **({"GPU": t.num_workers} if t.use_gpu else {})}
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if short:
        what = ", ".join(f"{need_} {k} (the cluster has {int(got)})" for k, (need_, got) in short.items())
        raise SpecError(
            "train.num_workers",
            f"{t.num_workers} worker(s) need {what}; Ray Train would wait forever for them. Lower "
            "train.num_workers"
            + (", set train.use_gpu: false" if "GPU" in short else "")
            + " or run on a larger cluster (--address)",
        )


def run_finetune(
    spec: JobSpec, *, address: str | None = None, overwrite: bool = False, progress: bool = True
) -> FinetuneResult:
    """Fine-tune `spec.stage.model` on `spec.input` and publish the model at `spec.output.uri`.

    `address` joins a running Ray cluster (else an embedded one starts); `overwrite` is the CLI's
    `--overwrite` (same as output.mode: overwrite). Raises ShardwiseError subclasses on failure.
    """
    from models.loading import model_identity, resolve_model
    from models.registry import available_tasks, get_task

    started = time.time()
    t = spec.train
    if spec.kind != "finetune" or t is None:
        raise SpecError(
            "kind", f"run_finetune runs kind: finetune jobs with a 'train' section; got kind {spec.kind!r}"
        )
    bind(spec)  # the task, its params and training options
    if overwrite:
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, mode="overwrite"))
    # A folder input's format comes from its files.
    spec = dataclasses.replace(
        spec,
        input=resolve_format(spec.input),
        train=dataclasses.replace(
            t, eval_input=resolve_format(t.eval_input) if t.eval_input is not None else None
        ),
    )
    t = spec.train
    assert t is not None
    stage = spec.stage
    task = get_task(stage.task)
    if t.class_weights is not None and label_mode(task) not in ("class", "class_sequence"):
        raise SpecError(
            "train.class_weights",
            f"task {stage.task!r} does not train a classifier over named classes; remove class_weights",
        )
    if not callable(getattr(task, "training", None)):
        can = sorted(
            name for name, tk in available_tasks().items() if callable(getattr(tk, "training", None))
        )
        raise SpecError(
            "stages[0].task", f"task {stage.task!r} cannot be fine-tuned yet; tasks that can: {can}"
        )

    _check_locations(spec)
    out = OutputDir(spec.output.uri, storage_options=spec.output.storage_options)
    # Read-only checks first: nothing (not even a lease file) is written before the job is known to be good.
    _check_output(spec, out, delete=False)
    # A local base model becomes an absolute path (workers run in their own directories); a remote one is
    # fetched by each worker into its node's cache.
    remote_model = "://" in stage.model and not stage.model.startswith("file://")
    base = stage.model if remote_model else resolve_model(stage.model, revision=stage.revision)
    if not remote_model:
        _check_base_model(base, stage.model)
    # The data checks are a Ray Data pass over the input (the driver never holds the rows): Ray starts
    # here, after the checks that need no data and before anything is written.
    init_ray(address=address, num_cpus=None if address else _embedded_cpus(t.num_workers))
    if address is None:
        _check_cluster(t)
    data = _prepare_data(spec)
    fp = _fingerprint(spec, data, model_identity(stage.model, revision=stage.revision))
    run_id = new_run_id()
    with Lease(out, run_id, what=f"fine-tune {spec.name!r}"):
        _check_output(spec, out, delete=False)  # again, now that no other run can change it
        return _finetune_locked(
            spec,
            out,
            data,
            base=base,
            fp=fp,
            run_id=run_id,
            started=started,
            address=address,
            progress=progress,
        )


def _finetune_locked(
    spec: JobSpec,
    out: OutputDir,
    data: _Data,
    *,
    base: str,
    fp: str,
    run_id: str,
    started: float,
    address: str | None,
    progress: bool,
) -> FinetuneResult:
    t = spec.train
    assert t is not None
    stage = spec.stage
    ckpt_uri = t.checkpoint_uri or posixpath.join(spec.output.uri.rstrip("/"), CHECKPOINTS)
    storage_path, storage_fs = _storage(ckpt_uri, spec.output.storage_options)
    run_name = _run_name(spec, fp)
    if spec.output.mode == "overwrite":
        _check_output(spec, out, delete=True)
        _clear_checkpoints(posixpath.join(ckpt_uri, run_name), spec.output.storage_options)

    def write_manifest(state: str, files: list[str] = (), reason: str | None = None) -> None:  # type: ignore[assignment]
        out.write_manifest(
            _finetune_manifest(
                spec, state=state, fingerprint=fp, run_id=run_id, files=list(files), reason=reason
            )
        )

    write_manifest("running")

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    loop = _LoopConfig(
        task=stage.task,
        base_model=base,
        input_names=tuple(stage.inputs),
        label_names=data.label_names,
        has_labels=data.train_source is not None and data.train_source.mode != "none",
        train=t,
        train_rows=data.train_rows,
        has_eval=data.eval is not None,
        threads=max(1, (os.cpu_count() or 1) // t.num_workers),
        label_counts=data.label_counts,
        class_weights=_class_weights(spec, data),
    )
    # Lazy reads: Ray Train's ingest executes "train" (streaming_split), each worker "eval".
    datasets = {"train": _dataset(ray, data, "train")}
    if data.eval is not None:
        datasets["eval"] = _dataset(ray, data, "eval")
    # Always made (a no-CPU actor): it also counts the steps a worker failure makes the run redo.
    board = ray.remote(num_cpus=0)(_Board).remote()
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"loop": loop, "board": board},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, placement_strategy=t.placement.upper()
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            # The best epoch's checkpoint (by `score`, see _score) is published; Ray Train also keeps the
            # latest one, which is all a resume needs. Mid-epoch checkpoints score below any epoch.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="keep", checkpoint_score_order="max"
            ),
            # A killed or preempted worker: restart the workers from the latest checkpoint, this many times.
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
        datasets=datasets,
        # Only "train" is split; every worker sees all of "eval" and keeps its stride (exact counts).
        dataset_config=_data_config(ray, t),
    )
    stop = threading.Event()
    watcher = _watch(board, stop, loop) if progress else None
    try:
        result = trainer.fit()
    except ShardwiseError as e:
        write_manifest("failed", reason=str(e))
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; report the cause in one paragraph
        cause = _worker_cause(e)
        write_manifest("failed", reason=f"{type(cause).__name__}: {cause}")
        if isinstance(cause, ShardwiseError):
            raise cause from e
        message = scrub(str(cause), secret_values(spec_to_dict(spec)))
        raise JobFailed(
            f"fine-tuning failed: {type(cause).__name__}: {message.rstrip('.')}. Fix the cause and rerun "
            f"the same job: it resumes from the last finished epoch, if any (checkpoints: {ckpt_uri!r})"
        ) from e
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
    if result.checkpoint is None:
        raise JobFailed(f"fine-tuning reported no checkpoint (see the Ray Train logs under {ckpt_uri!r})")
    with result.checkpoint.as_directory() as ckpt_dir:  # the latest: it holds every epoch's record
        history = json.loads(Path(ckpt_dir, METRICS_FILE).read_text())["epochs"]
    best_epoch = (
        max(history, key=lambda r: (r.get("score", r["epoch"]), -r["epoch"]))["epoch"] if history else 0
    )
    best = _best_checkpoint(result, best_epoch)
    wall = time.time() - started
    metrics = {
        "task": stage.task,
        "base_model": stage.model,
        "label_names": list(data.label_names),
        "train_rows": data.train_rows,
        "eval_rows": data.eval_rows,
        "num_workers": t.num_workers,
        "use_gpu": t.use_gpu,
        # Without storage options: they may hold credentials.
        "train": {
            **spec_to_dict(t),
            "eval_input": t.eval_input and {"uri": t.eval_input.uri, "format": t.eval_input.format},
        },
        "fingerprint": fp,
        "epochs": history,
        # The published weights are this epoch's (the best eval score; the last epoch without an eval set).
        "best_epoch": best_epoch,
        "stopped_early": bool(history and history[-1].get("stopped_early")),
        "wall_s": wall,
    }
    metrics = redact(metrics)  # train.options may hold storage options or tokens
    published: list[str] = []

    def listed(files: list[str]) -> None:
        published.extend(files)
        write_manifest("publishing", files)

    merge = None
    if t.lora is not None and t.lora.merge:
        merge = functools.partial(
            _merge_lora, task=stage.task, base=base, label_names=data.label_names, train=t
        )
    _publish(best, out, metrics=metrics, manifest=listed, prepare=merge)
    write_manifest("succeeded", published)
    out.write_success()
    if t.checkpoint_uri is None and out.exists(CHECKPOINTS):
        out.fs.rm(out.path(CHECKPOINTS), recursive=True)  # the published folder holds the final weights
    return FinetuneResult(
        output_uri=spec.output.uri,
        epochs=len(history),
        train_rows=metrics["train_rows"],
        eval_rows=metrics["eval_rows"],
        label_names=data.label_names,
        metrics=history,
        wall_s=wall,
    )


def _data_config(ray: Any, t: FinetuneSpec) -> Any:
    """Only "train" is split; every worker sees all of "eval" and keeps its stride (exact counts). With
    mid-epoch checkpoints the train rows arrive in plan order (the shards' order is seeded), so a restored
    epoch that skips the batches it already trained on skips the same rows (exactly with one worker; with
    several, the split across workers may deal them out differently)."""
    if not t.checkpoint_every_steps:
        return ray.train.DataConfig(datasets_to_split=["train"])
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options={"train": options})


def _best_checkpoint(result: Any, epoch: int) -> Any:
    """The checkpoint reported at the end of `epoch` (Ray Train kept it for its score), else the latest."""
    for checkpoint, metrics in result.best_checkpoints or []:
        if metrics.get("epoch") == epoch and metrics.get("score", _NO_SCORE) > _NO_SCORE:
            return checkpoint
    return result.checkpoint


def _class_weights(spec: JobSpec, data: _Data) -> tuple[float, ...] | None:
    """`train.class_weights: balanced`: n_rows / (n_classes × rows of the class), from the training labels
    (sklearn's "balanced"); a class with no training row gets weight 0 rather than a division by zero."""
    import numpy as np

    from models.registry import get_task

    t = spec.train
    assert t is not None
    if t.class_weights is None:
        return None
    mode = label_mode(get_task(spec.stage.task))
    if mode not in ("class", "class_sequence"):
        raise SpecError(
            "train.class_weights",
            f"task {spec.stage.task!r} does not train a classifier over named classes; remove class_weights",
        )
    # Per-class training rows (tags, for sequences) from the streaming pass; the rows are never on the driver.
    counts = np.asarray(data.label_counts, dtype=np.float64)
    n_classes = len(data.label_names)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return tuple(float(w) for w in weights)


def _worker_cause(exc: BaseException) -> BaseException:
    """The first worker's own exception inside Ray Train's wrappers (WorkerGroupError, RayTaskError)."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    for _ in range(5):  # RayTaskError(cause) → the user exception, a few levels at most
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc


# -------------------------------------------------------------------------------------------------------
# Progress: rank 0 posts its step to a tiny actor; a driver thread draws the bar (the driver itself is
# blocked in `trainer.fit()`, and worker output does not reach the driver console).


class _Board:
    """Holds rank 0's latest progress; a Ray actor with no CPU (`ray.remote(num_cpus=0)(_Board)`).

    It lives on the driver's side of a worker failure, so after a restart it still knows the furthest
    step any worker reached: a resumed run reports how many steps the failure cost (`steps_redone`)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.furthest = 0

    def post(self, state: dict[str, Any]) -> None:
        self.state = state
        self.furthest = max(self.furthest, int(state.get("step", 0)))

    def get(self) -> dict[str, Any]:
        return self.state

    def furthest_step(self) -> int:
        return self.furthest


def _watch(board: Any, stop: threading.Event, loop: _LoopConfig) -> threading.Thread:
    def run() -> None:
        import ray
        from tqdm import tqdm

        per_worker = max(1, loop.train.batch_size // loop.train.num_workers)
        steps = math.ceil((loop.train_rows // loop.train.num_workers) / per_worker) * loop.train.epochs
        bar = tqdm(total=steps, unit="step", file=sys.stderr, dynamic_ncols=True, desc="shardwise finetune")
        shown: dict[str, Any] = {}
        try:
            while not stop.wait(0.5):
                try:
                    state = ray.get(board.get.remote(), timeout=5)
                except Exception:  # noqa: BLE001 - progress must never fail the job
                    continue
                if state and state != shown:
                    bar.n = min(state["step"], steps)
                    bar.set_postfix({k: v for k, v in state.items() if k != "step"}, refresh=False)
                    bar.refresh()
                    shown = state
        finally:
            bar.close()

    thread = threading.Thread(target=run, name="shardwise-finetune-progress", daemon=True)
    thread.start()
    return thread


# -------------------------------------------------------------------------------------------------------
# The training loop (runs in every Ray Train worker)


def _to_device(value: Any, device: Any) -> Any:
    """Tensors anywhere in `encode`'s output (dicts, lists: DETR's per-image targets) → `device`."""
    if hasattr(value, "to") and callable(value.to):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _accuracy_counts(output: Any, batch: Mapping[str, Any]) -> tuple[float, float]:
    """Default eval metric: argmax(logits) == labels where labels != -100; (B,) or (B, T) labels."""
    labels = batch["labels"]
    keep = labels != -100
    correct = (output.logits.argmax(-1) == labels) & keep
    return float(correct.sum().item()), float(keep.sum().item())


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `Trainable.encode`'s output that go to `model(**...)`: keys starting with "_" are
    extras for `eval_predictions` (answer offsets, image sizes, target texts), not model inputs."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _split_extras(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`encode`'s output → (model inputs, extras); see `model_inputs`."""
    return model_inputs(batch), {k: v for k, v in batch.items() if k.startswith("_")}


def _score(record: Mapping[str, Any], best: tuple[str, str] | None) -> float:
    """What picks the published epoch, higher is better: the task's eval metric (`Trainable.eval_score`,
    negated when lower is better: WER, perplexity) when there is one, else the task's eval accuracy, else
    the negated eval loss, else the epoch number (no eval set: the last epoch)."""
    if best is not None and record.get(best[0]) is not None:
        value = float(record[best[0]])
        return value if best[1] == "max" else -value
    if record.get("eval_accuracy") is not None:
        return float(record["eval_accuracy"])
    if record.get("eval_loss") is not None:
        return -float(record["eval_loss"])
    return float(record["epoch"])


def _eval_score(trainable: Any) -> tuple[str, str] | None:
    """The task's `eval_score` (record key, "max" | "min"), checked; None for a task without task metrics."""
    best = getattr(trainable, "eval_score", None)
    if best is None:
        return None
    if not (isinstance(best, tuple) and len(best) == 2 and best[1] in ("max", "min")):
        raise TypeError(
            f"{type(trainable).__name__}.eval_score must be (record key, 'max' | 'min'), got {best!r}"
        )
    return best


def _gathered_metrics(
    trainable: Any, pairs: list[tuple[Any, Any]], *, rank: int, world: int
) -> dict[str, float]:
    """Every worker's (prediction, reference) pairs → rank 0, which computes the task metrics
    (`eval_metrics`) once; the result is broadcast so that every rank holds the same record (early stopping
    must stop every rank at the same epoch). A set with nothing to score gives no task metrics (logged)."""
    import logging

    from models.metrics import MetricsError

    if world > 1:
        import torch.distributed as dist

        parts: list[Any] = [None] * world if rank == 0 else []
        dist.gather_object(pairs, parts if rank == 0 else None, dst=0)
        pairs = [pair for part in parts for pair in part] if rank == 0 else []
    result: dict[str, float] = {}
    if rank == 0 and pairs:
        try:
            result = trainable.eval_metrics(pairs)
        except MetricsError as e:
            logging.getLogger(__name__).warning("no task metrics for this epoch: %s", e)
    if world > 1:
        import torch.distributed as dist

        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def _shown_eval(record: Mapping[str, Any], best: tuple[str, str] | None) -> dict[str, float]:
    """An epoch's eval figures for the progress line: accuracy and the task's metric (`eval_` dropped)."""
    shown = {}
    for key in ("eval_accuracy", best[0] if best else None):
        if key is not None and record.get(key) is not None:
            shown[key.removeprefix("eval_").replace("accuracy", "acc")] = round(float(record[key]), 4)
    return shown


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from transformers import get_linear_schedule_with_warmup

    from models.loading import resolve_model
    from models.lora import apply_lora, read_adapter, save_lora
    from models.registry import get_task

    loop: _LoopConfig = config["loop"]
    board = config["board"]
    t = loop.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop.threads)  # the node's cores split between its workers
    torch.manual_seed(t.seed)  # the fresh head starts the same everywhere (DDP also broadcasts rank 0's)

    base_dir = resolve_model(loop.base_model)
    task = cast(FineTunable, get_task(loop.task))
    trainable = task.training(
        base_dir, label_names=loop.label_names, max_length=t.max_length, options=dict(t.options)
    )
    eval_counts = getattr(trainable, "eval_counts", None) or _accuracy_counts
    # Task metrics: (prediction, reference) per eval row, on every worker; metrics on rank 0 (see Trainable).
    predict = getattr(trainable, "eval_predictions", None)
    score_by = _eval_score(trainable)

    def encode(batch: pa.Table) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model inputs on the worker's device, and the task's extras (see `_split_extras`)."""
        columns = {name: batch.column(name).to_pylist() for name in loop.input_names}
        labels = batch.column(_LABEL).to_pylist() if loop.has_labels else None
        inputs, extras = _split_extras(trainable.encode(columns, labels))
        return _to_device(inputs, device), extras

    per_worker = max(1, t.batch_size // world)
    accum = t.grad_accum_steps
    # Micro-batches per epoch (the same on every rank: an equal split), and optimizer steps.
    micro_per_epoch = math.ceil((loop.train_rows // world) / per_worker)
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = steps_per_epoch * t.epochs

    history, state, position, adapter = [], None, None, None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            # LoRA checkpoints hold the adapter only: the base is rebuilt and the adapter loaded onto it.
            model = trainable.build_model(d if t.lora is None else base_dir)
            adapter = read_adapter(d) if t.lora is not None else None
            history = json.loads(Path(d, METRICS_FILE).read_text())["epochs"]
            if Path(d, _TRAIN_STATE).exists():
                state = torch.load(Path(d, _TRAIN_STATE), map_location="cpu", weights_only=True)
                position = state.get("position")
    else:
        model = trainable.build_model(base_dir)
    if t.lora is not None:
        model = apply_lora(model, t.lora, task_name=loop.task, state=adapter)
    model = ray.train.torch.prepare_model(model)  # to the worker's device; DDP when world > 1
    core: torch.nn.Module = model.module if isinstance(model, DistributedDataParallel) else model
    device = ray.train.torch.get_device()

    # No weight decay on biases and norm weights (1-d), as in the HF Trainer and nanoGPT.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=t.lr,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * total_steps), total_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if loop.has_eval else None
    weights = (
        torch.tensor(loop.class_weights, dtype=torch.float32, device=device) if loop.class_weights else None
    )

    def loss_of(out: Any, inputs: Mapping[str, Any]) -> Any:
        if weights is None:
            return out.loss
        # Class-weighted cross-entropy over the logits (sequence or token classification; -100 is ignored).
        logits = out.logits
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            inputs["labels"].reshape(-1),
            weight=weights,
            ignore_index=-100,
        )

    def save(tmp: str, *, position: dict[str, Any] | None, keep_optimizer: bool) -> None:
        if t.lora is not None:  # the adapter; `merge: true` merges it at publish time
            save_lora(core, tmp, trainable=trainable, base=loop.base_model)
        else:
            trainable.save(core, tmp)
        Path(tmp, METRICS_FILE).write_text(json.dumps({"epochs": history}, indent=1))
        if keep_optimizer:  # a run that continues needs the optimizer, the schedule and where it was
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    **({"position": position} if position is not None else {}),
                },
                Path(tmp, _TRAIN_STATE),
            )

    def report(metrics: dict[str, Any], *, position: dict[str, Any] | None, keep_optimizer: bool) -> None:
        """Every rank reports (a collective); rank 0 with the checkpoint."""
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="shardwise-ckpt-") as tmp:
                save(tmp, position=position, keep_optimizer=keep_optimizer)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    def optimizer_step(step: int) -> int:
        torch.nn.utils.clip_grad_norm_(model.parameters(), _MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return step + 1

    nodes = 1
    if world > 1:
        import torch.distributed as dist

        every_node: list[Any] = [None] * world
        dist.all_gather_object(every_node, ray.get_runtime_context().get_node_id())
        nodes = len(set(every_node))

    start_epoch = position["epoch"] if position is not None else len(history)
    step = position["step"] if position is not None else (history[-1].get("steps", 0) if history else 0)
    resumed_step = step
    # Steps trained before a failure and lost with it: the furthest step posted, less the checkpoint's.
    redone = max(0, ray.get(board.furthest_step.remote()) - step) if resumed is not None else 0
    for epoch in range(start_epoch, t.epochs):
        epoch_start = time.time()
        model.train()
        # train loss·rows, train rows, eval loss·rows, eval rows, eval hits, eval total
        sums = torch.zeros(6, dtype=torch.float64)
        # A mid-epoch checkpoint: skip the micro-batches its steps consumed (the epoch's order is seeded).
        skip = 0
        if position is not None and position["epoch"] == epoch:
            skip = position["micro"]
            sums[:2] = torch.tensor(position["sums"], dtype=torch.float64)
        micro, pending = 0, False
        for batch in train_shard.iter_batches(
            batch_size=per_worker,
            batch_format="pyarrow",
            local_shuffle_buffer_size=per_worker * 8,
            local_shuffle_seed=t.seed * 1_000_003 + epoch * 1_009 + rank,
        ):
            micro += 1
            if micro <= skip:
                continue
            inputs, _ = encode(batch)
            with autocast:
                out = model(**inputs)
                loss = loss_of(out, inputs)
            (loss / accum).backward()  # gradients of `accum` micro-batches add up to one step's
            sums[0] += loss.item() * batch.num_rows
            sums[1] += batch.num_rows
            pending = micro % accum != 0
            if pending:
                continue
            step = optimizer_step(step)
            if rank == 0:
                shown = {"step": step, "epoch": f"{epoch + 1}/{t.epochs}", "loss": round(loss.item(), 4)}
                if history:  # the previous epoch's eval figures
                    shown.update(_shown_eval(history[-1], score_by))
                board.post.remote(shown)
            every = t.checkpoint_every_steps
            if every and step % every == 0 and micro < micro_per_epoch:
                here = {"epoch": epoch, "micro": micro, "step": step, "sums": sums[:2].tolist()}
                report(
                    {"epoch": epoch, "step": step, "score": _NO_SCORE, "keep": _NO_SCORE},
                    position=here,
                    keep_optimizer=True,
                )
        if pending:  # the epoch's last, partial group
            step = optimizer_step(step)

        pairs: list[tuple[Any, Any]] = []
        if eval_shard is not None:
            core.eval()  # the bare module: DDP's forward would sync buffers, and ranks run unequal batches here
            with torch.inference_mode():
                for batch in eval_shard.iter_batches(batch_size=per_worker * world, batch_format="pyarrow"):
                    mine = [i for i, r in enumerate(batch.column(_ROW).to_pylist()) if r % world == rank]
                    if not mine:
                        continue
                    batch = batch.take(mine)
                    inputs, extras = encode(batch)
                    with autocast:
                        out = core(**inputs)
                        if predict is not None:  # seq2seq generates here: bounded, see Seq2SeqTrainable
                            pairs.extend(predict(out, {**inputs, **extras}, model=core))
                    hits, total = eval_counts(out, inputs)
                    sums[2] += out.loss.item() * batch.num_rows
                    sums[3] += batch.num_rows
                    sums[4] += hits
                    sums[5] += total
        if world > 1:
            import torch.distributed as dist

            # gloo reduces CPU tensors; NCCL needs them on the GPU.
            reduced = sums.to(device)
            dist.all_reduce(reduced)
            sums = reduced.cpu()
        rows = max(sums[1].item(), 1)
        eval_rows, eval_total = int(sums[3].item()), sums[5].item()
        record = {
            "epoch": epoch + 1,
            "steps": step,  # optimizer steps so far
            "nodes": nodes,  # distinct nodes the workers ran on
            "train_loss": sums[0].item() / rows,
            "eval_loss": sums[2].item() / eval_rows if eval_shard is not None and eval_rows else None,
            "eval_accuracy": sums[4].item() / eval_total if eval_shard is not None and eval_total else None,
            "epoch_s": time.time() - epoch_start,
        }
        if epoch == start_epoch and resumed is not None:
            record["resumed_at_step"] = resumed_step  # this epoch continued from a checkpoint at that step
            record["steps_redone"] = (
                redone  # steps a failure cost (0 after a driver restart: its board is new)
            )
        if predict is not None and eval_shard is not None:
            record.update(_gathered_metrics(trainable, pairs, rank=rank, world=world))
        history.append(record)
        record["score"] = _score(record, score_by)
        best = max(range(len(history)), key=lambda i: (history[i]["score"], -i))
        stop_early = (
            t.early_stopping_patience is not None
            and epoch + 1 - history[best]["epoch"] >= t.early_stopping_patience
        )
        record["stopped_early"] = stop_early and epoch + 1 < t.epochs
        # What Ray Train keeps checkpoints by: the score, ties going to the earlier epoch (the one published).
        metrics = {k: v for k, v in record.items() if v is not None} | {
            "keep": record["score"] - 1e-9 * epoch
        }
        if rank == 0 and record["eval_loss"] is not None:
            board.post.remote(
                {"step": step, "epoch": f"{epoch + 1}/{t.epochs}", **_shown_eval(record, score_by)}
            )
        last = epoch + 1 == t.epochs or stop_early
        report(metrics, position=None, keep_optimizer=not last)
        if stop_early:
            break
