"""Training data: planned shards read by Ray Data tasks, never by the driver.

  driver   list the files, plan row-range shards (file metadata only: pipeline.plan)
         → streaming pass: from_items(shards) → map_batches(_summarise): each task reads its shard with
           `read_shard` (the inference path's reader and checks) and returns one small summary (row
           counts per side, parse errors, null counts with a few row ids, label value counts); the driver
           merges summaries as they arrive and raises the data errors, still before anything is written
         → label names (sorted distinct, or train.label_names) and their ids, per-class counts
         → train / eval datasets: from_items(shards) → map_batches(_training_rows): read the shard again,
           keep its side's rows, labels → ids, (train) shuffle within the shard; lazy, executed by Ray
           Train's ingest (the train split) and by each worker (eval)

The eval split needs no shared state: a row is an eval row when a hash of its id keyed by train.seed is
below eval_fraction, so both reads agree, reruns agree, and train and eval never share a row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.registry import LabelMode, get_task, label_mode, text_inputs
from pipeline.block import ID, READ_ERROR, ROW
from pipeline.errors import ShardwiseError, SourceError, SpecError
from pipeline.plan import Shard, plan_shards
from pipeline.sources import input_schema, list_fragments, read_shard
from pipeline.spec import InputSpec, JobSpec
from pipeline.train.labels import (
    LabelTally,
    class_summary,
    keep_first,
    label_ids,
    label_names_of,
    null_ids,
)

__all__ = ["LABEL", "ROW", "Source", "Tally", "TrainingData", "dataset", "prepare_data"]

# Columns of the train/eval datasets besides the task inputs (the `__` prefix keeps them apart from input
# names): the label ids, and (eval rows) a row number unique over the eval set (file index · 2^32 + row in
# file; named like the block's row column, pipeline.block.ROW).
LABEL = "__label"
# max_train_rows reads a prefix of the input (as the cap needs); the split's share varies around
# eval_fraction, so the prefix has this much slack before the train rows are cut exactly.
_CAP_SLACK = 1.1


@dataclass(frozen=True)
class Source:
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
class TrainingData:
    """What the driver holds of the training data: plans and small summaries, never rows."""

    # Shard items (`_plan_items`) of the training rows, in a seeded order, each with its train-row quota.
    train: Any
    eval: Any  # shard items of the eval rows, or None (no eval set)
    label_names: tuple[str, ...]
    listing: list[Any]  # what identifies the data, for the run fingerprint
    train_source: Source | None = None
    eval_source: Source | None = None
    # Label → id rule for the read tasks: ids are positions in `keys` (class names, or integer labels).
    keys: tuple[Any, ...] = ()
    # Training rows per class, in id order (class and class_sequence labels; per tag for sequences).
    label_counts: tuple[int, ...] = ()
    train_rows: int = 0
    eval_rows: int = 0


def _eval_mask(ids: Sequence[str], *, seed: int, fraction: float) -> Any:
    """(rows,) bool: the rows of a split input that evaluate. blake2b of the id keyed by the seed: stable
    across processes and machines (Python's hash() is not), and independent of which shard a row is in."""
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


def _read_item(item: Mapping[str, Any], source: Source) -> tuple[pa.Table, Any]:
    """One planned shard's rows (`read_shard`: the file must still be the planned one) and its eval mask."""
    shard = Shard.from_dict(json.loads(item["shard"]))
    table = read_shard(source.spec, shard.fragment, shard.start, shard.stop, columns=list(source.columns))
    if source.role == "split":
        mask = _eval_mask(table.column(ID).to_pylist(), seed=source.seed, fraction=source.eval_fraction)
    else:
        mask = np.full(table.num_rows, source.role == "eval")
    return table, mask


def _summarise(batch: pa.Table, *, sources: Sequence[Source]) -> pa.Table:
    """Streaming pass (a Ray Data task): read each shard of the block and summarise it (JSON, one row)."""
    out = []
    for item in batch.to_pylist():
        source = sources[item["source"]]
        table, is_eval = _read_item(item, source)
        ids = table.column(ID)
        errors = table.column(READ_ERROR).drop_null()
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
                "null_ids": null_ids(column, ids) if column.null_count else [],
            }
        if source.mode != "none":
            assert source.label_column is not None
            labels = table.column(source.label_column).combine_chunks()
            id_list = ids.to_pylist()
            if source.mode == "class":
                summary["label"] = class_summary(labels, id_list, is_eval.tolist())
            elif source.mode == "class_sequence":
                seq: dict[str, Any] = {
                    "type": str(labels.type),
                    "kind": "list"
                    if pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type)
                    else "null"
                    if pa.types.is_null(labels.type)
                    else "bad",
                    "nulls": labels.null_count,
                    "null_ids": null_ids(labels, ids) if labels.null_count else [],
                }
                if seq["kind"] == "list":
                    lengths = pc.list_value_length(labels).fill_null(0).to_numpy(zero_copy_only=False)
                    rows = np.repeat(np.arange(len(labels)), lengths)
                    seq["elements"] = class_summary(
                        pc.list_flatten(labels),
                        [id_list[i] for i in rows],
                        is_eval[rows].tolist(),
                    )
                summary["label"] = seq
            else:  # raw
                raw: dict[str, Any] = {
                    "nulls": labels.null_count,
                    "null_ids": null_ids(labels, ids) if labels.null_count else [],
                }
                if source.derive is not None:
                    raw["names"] = _derive_names(labels.drop_null().to_pylist(), source)
                summary["label"] = raw
        out.append(json.dumps(summary, default=str))
    return pa.table({"summary": pa.array(out, pa.string())})


def _derive_names(values: list[Any], source: Source) -> list[str]:
    """The task's names for one shard's raw targets (e.g. the characters of its transcripts). The driver
    takes the union and passes it through the hook once more, so the hook must be idempotent on its own
    names (a sorted character set is). A shard of string targets that yields none (all transcripts empty)
    contributes none: the driver's final call decides whether the whole input has none."""
    derive = getattr(get_task(source.derive or ""), "training_label_names")  # noqa: B009 - an optional hook
    try:
        return list(derive(values, options=dict(source.options), key="train.label_column"))
    except SpecError:
        if values and all(isinstance(v, str) for v in values):
            return []
        raise


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
            keep_first(self.null_ids.setdefault(name, []), pos, info["null_ids"])

    def check(self, source: Source) -> None:
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


class Tally:
    """The streaming pass's result: every summary merged on arrival (the driver keeps no per-row state)."""

    def __init__(self, sources: Sequence[Source], *, mode: LabelMode, column: str) -> None:
        self.sources = [_SourceTally() for _ in sources]
        self.mode, self.column = mode, column
        self.labels = LabelTally()  # class labels, or the elements of class_sequence labels
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
        keep_first(self.null_ids, pos, label["null_ids"])
        self.derived.update(label.get("names", ()))


def _training_rows(
    batch: pa.Table, *, source: Source, side: Literal["train", "eval"], keys: Sequence[Any]
) -> pa.Table:
    """Read task of the train/eval datasets: each shard's rows of `side`, as `train_loop` takes them
    (task input names, `__label` ids; eval rows a `__row` unique over the eval set: file index · 2^32 + row
    in file; train rows shuffled within the shard, seeded)."""
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
            cols[LABEL] = label_ids(rows.column(source.label_column), source.mode, keys)
        if side == "eval":
            in_file = rows.column(ROW).to_numpy().astype(np.int64)
            cols[ROW] = pa.array(item["file"] * 2**32 + in_file, pa.int64())
        tables.append(pa.table(cols))
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _lazy(ray: Any, items: list[dict[str, Any]], fn: Callable[..., pa.Table], **kwargs: Any) -> Any:
    """from_items(shard items, one block each) → map_batches(fn): reads run in Ray Data tasks."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # A copy, current only while the dataset is built (a Dataset seals the context it was created under).
    ctx = DataContext.get_current().copy()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    with DataContext.current(ctx):
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        return ds.map_batches(fn, batch_size=None, batch_format="pyarrow", fn_kwargs=kwargs)


def dataset(ray: Any, data: TrainingData, side: Literal["train", "eval"]) -> Any:
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


def _scan(ray: Any, items: list[dict[str, Any]], tally: Tally, sources: Sequence[Source]) -> None:
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


def _check_schema(source: Source, fragments: Sequence[Any], columns: Mapping[str, str]) -> None:
    """A missing column is a SpecError naming its key, from the first file's schema (metadata only; the read
    tasks check every file)."""
    if not fragments or source.spec.resolved_format() == "jsonl":  # jsonl: read_range checks parsed keys
        return
    names = input_schema(source.spec, fragments[0]).names
    for col, key in columns.items():
        if col not in names:
            raise SpecError(key, f"column {col!r} is not in {source.spec.uri!r}; its columns: {names}")


def _plan_items(
    spec: JobSpec, source: Source, fragments: list[Any], *, index: int, first: int
) -> list[dict[str, Any]]:
    """The source's shards (pipeline.plan, as inference cuts them) as from_items rows: the shard, its
    source, its position over all sources (`pos`: plan order), its file's index, a train-row quota."""
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


def prepare_data(spec: JobSpec) -> TrainingData:
    """Plan the rows, check them and name the labels with a streaming pass on Ray (running already), and
    split train/eval by row-id hash. The driver holds plans and summaries, never rows."""
    import ray

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

    def source(ispec: InputSpec, role: Literal["train", "eval", "split"]) -> Source:
        return Source(
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

    tally = Tally(sources, mode=mode, column=t.label_column)
    every = [item for plan in plans for item in plan]
    if every:
        _scan(ray, every, tally, sources)
    for src, st in zip(sources, tally.sources, strict=True):
        st.check(src)
    train_tally = tally.sources[0]
    if train_tally.rows == 0:
        raise SourceError(f"input.uri {spec.input.uri!r} has no rows to train on")

    names, keys, counts = label_names_of(tally, t, task)
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
    return TrainingData(
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
