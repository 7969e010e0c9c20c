"""Training labels: what `train.label_column` holds, checked over every row by the streaming pass
(pipeline.train.data) and turned into ids by the read tasks.

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

The pass summarises each shard's labels (`class_summary`: value counts per side, nulls with a few row ids);
the driver merges the summaries (`LabelTally`) and names the classes (`label_names_of`); the read tasks map
labels to ids (`label_ids`). `train.class_weights: balanced` comes from the same counts (`class_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.registry import LabelMode
from pipeline.errors import SpecError
from pipeline.spec import FinetuneSpec, JobSpec

if TYPE_CHECKING:
    from pipeline.train.data import Tally, TrainingData

__all__ = [
    "MAX_CLASSES",
    "QUOTE",
    "LabelTally",
    "class_summary",
    "class_weights",
    "keep_first",
    "label_ids",
    "label_names_of",
    "null_ids",
    "quote_counts",
    "resolve_labels",
]

# Values of a bad label column quoted in an error message: enough to recognise the problem.
QUOTE = 5
# Labels a classifier may have before the label column is taken for something else (a text column).
MAX_CLASSES = 100_000


def resolve_labels(
    values: pa.ChunkedArray | pa.Array,
    *,
    label_names: tuple[str, ...] | None,
    column: str,
    row_ids: Sequence[str],
) -> tuple[tuple[str, ...], list[int]]:
    """(label names in id order, the id of every row); raises SpecError naming the column and the values.

    The in-memory form of what a fine-tune does in two steps: the streaming pass summarises each shard's
    labels (`class_summary`), the driver names the classes from the merged counts (`LabelTally.names`),
    and the read tasks turn labels into ids (`label_ids`)."""
    summary = class_summary(values, list(row_ids), [False] * len(values))
    tally = LabelTally()
    tally.add(0, summary)
    names, keys = tally.names(label_names=label_names, column=column)
    return names, label_ids(values, "class", keys).to_pylist()


def quote_counts(counts: Mapping[Any, int]) -> str:
    """`'posit' (3 rows), 7 (1 row)`: the first few bad values, each with its number of rows (in order of
    first appearance: ties keep it)."""
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{v!r} ({n} row{'s' if n > 1 else ''})" for v, n in items[:QUOTE])
    return text + (f" and {len(items) - QUOTE} more" if len(items) > QUOTE else "")


def null_ids(column: pa.ChunkedArray | pa.Array, ids: pa.ChunkedArray | pa.Array) -> list[str]:
    """The first `QUOTE` row ids whose value in `column` is null (for the error message)."""
    return ids.filter(pc.is_null(column)).slice(0, QUOTE).to_pylist()


def class_summary(values: pa.ChunkedArray | pa.Array, ids: list[str], is_eval: Sequence[bool]) -> dict:
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
    nulls: list[str] = []
    for v, row_id, ev in zip(values.to_pylist(), ids, is_eval, strict=True):
        if v is None:
            if len(nulls) < QUOTE:
                nulls.append(row_id)
            continue
        c = counts.setdefault(v, [0, 0])
        c[1 if ev else 0] += 1
    summary["null_ids"] = nulls
    summary["counts"] = [[v, tr, ev] for v, (tr, ev) in counts.items()]
    return summary


def keep_first(kept: list[tuple[int, int, str]], pos: int, ids: Sequence[str]) -> None:
    """The first `QUOTE` row ids in plan order, from shards that arrive in any order."""
    kept.extend((pos, i, row_id) for i, row_id in enumerate(ids))
    kept.sort()
    del kept[QUOTE:]


class LabelTally:
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
        keep_first(self.null_ids, pos, s["null_ids"])
        for i, (v, tr, ev) in enumerate(s.get("counts", ())):
            c = self.counts.get(v)
            if c is None:
                if len(self.counts) >= MAX_CLASSES:
                    raise SpecError(
                        "train.label_column",
                        f"column {column!r} has more than {MAX_CLASSES} distinct labels; a classifier's labels "
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
                        f"(0..{len(label_names) - 1} for {list(label_names)}), but has {quote_counts(bad)}. "
                        "Fix the labels, list a name for every id, or leave train.label_names unset to name the "
                        "classes by their values",
                    )
                return label_names, tuple(range(len(label_names)))
            bad = {v: n for v, n in rows.items() if v not in set(label_names)}
            if bad:
                raise SpecError(
                    "train.label_names",
                    f"column {column!r} has labels that are not in train.label_names {list(label_names)}: "
                    f"{quote_counts(bad)}. Fix the data, add those names to train.label_names, or leave it "
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


def label_ids(values: pa.ChunkedArray | pa.Array, mode: LabelMode, keys: Sequence[Any]) -> pa.Array:
    """Labels → ids (read tasks): the position of each label in `keys`; lists of labels → lists of ids;
    raw targets as they are. The streaming pass has checked that every label has a key."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if mode == "raw":
        return values
    if mode == "class_sequence":
        ids = label_ids(pc.list_flatten(values), "class", keys)
        lengths = pc.list_value_length(values).fill_null(0).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), ids)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    kind = pa.int64() if keys and isinstance(keys[0], int) else pa.string()
    found = pc.index_in(values.cast(kind), value_set=pa.array(list(keys), kind))
    return found.cast(pa.int64())


def label_names_of(
    tally: Tally, t: FinetuneSpec, task: Any
) -> tuple[tuple[str, ...], tuple[Any, ...], tuple[int, ...]]:
    """(label names, keys for `label_ids`, training rows per class) from the pass, or the labels' error."""
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


def class_weights(spec: JobSpec, data: TrainingData) -> tuple[float, ...] | None:
    """`train.class_weights: balanced`: n_rows / (n_classes × rows of the class), from the training labels
    (sklearn's "balanced"); a class with no training row gets weight 0 rather than a division by zero.
    jobs.finetune has refused class_weights for a task without named classes before Ray started."""
    t = spec.train
    assert t is not None
    if t.class_weights is None:
        return None
    # Per-class training rows (tags, for sequences) from the streaming pass; the rows are never on the driver.
    counts = np.asarray(data.label_counts, dtype=np.float64)
    n_classes = len(data.label_names)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return tuple(float(w) for w in weights)
