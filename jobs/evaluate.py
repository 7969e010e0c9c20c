"""`shardwise evaluate OUT --labels COLUMN`: score an inference output against a labelled column.

The labels come from the output itself when the job kept the column (`input.keep_columns`), otherwise from
the job's input (or `--input`), joined to the predictions by the id column: the input's `id_column`, or the
default row id `<file>:<row>` — which only matches when `--input` is the same input the job read. Error
records are rows without a prediction: they are counted (`rows_missing`), not scored. The metrics are those
of `models.metrics` for the output's task, overall and per class; they are written beside the predictions
as `_metrics/eval.json` (a `_` name: Parquet readers skip it, `--overwrite` deletes it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from models.metrics import METRICS, MetricsError, score
from pipeline.block import ID
from pipeline.commit import OutputDir, read_errors, read_output
from pipeline.errors import OutputError, ShardwiseError, SpecError
from pipeline.sources import input_schema, list_fragments, read_range, resolve_format
from pipeline.spec import InputSpec

__all__ = [
    "EVAL_FILE",
    "eval_file",
    "evaluate",
    "format_table",
    "input_spec",
]

EVAL_FILE = "_metrics/eval.json"
# Per-class rows the printed table shows (all of them are in the JSON).
_TABLE_CLASSES = 25


def input_spec(data: dict[str, Any], *, uri: str | None) -> Any:
    """The job's InputSpec as the manifest recorded it (storage options are redacted there: none are
    used), or `uri` read with the job's id column and a format from the URI."""
    keep = data.get("keep_columns")
    return InputSpec(
        uri=uri if uri is not None else str(data["uri"]),
        format=None if uri is not None else data.get("format"),
        id_column=data.get("id_column"),
        keep_columns=dict(keep) if isinstance(keep, dict) else tuple(keep) if keep is not None else None,
    )


def _read_input_columns(spec: Any, columns: dict[str, str | None]) -> tuple[dict[str, tuple[Any, ...]], str]:
    """{row id: values of `columns` (None for a column the input lacks)} for every input row. A wanted column
    marked required (value "required") must exist."""
    spec = resolve_format(spec)
    fragments = list_fragments(spec)
    if not fragments:
        raise OutputError(f"the input {spec.uri!r} has no files; pass the labelled data with --input")
    names = input_schema(spec, fragments[0]).names
    present = []
    for col, need in columns.items():
        if col in names:
            present.append(col)
        elif need == "required":
            raise SpecError(
                "--labels",
                f"column {col!r} is neither kept in the output nor in the input {spec.uri!r} (its columns: "
                f"{names}); name the labelled column, or pass the labelled data with --input",
            )
    rows: dict[str, tuple[Any, ...]] = {}
    for fragment in fragments:
        table = read_range(spec, fragment, 0, fragment.num_rows, columns=present)
        values = [table.column(c).to_pylist() if c in present else [None] * table.num_rows for c in columns]
        for i, row_id in enumerate(table.column(ID).to_pylist()):
            rows[row_id] = tuple(v[i] for v in values)
    return rows, spec.uri


def evaluate(
    output: str,
    *,
    labels: str,
    input_uri: str | None = None,
    task: str | None = None,
    label_names: Sequence[str] | None = None,
    stage: str | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Score the predictions in `output` against the column `labels`; returns (and writes to
    `<output>/_metrics/eval.json`, or `eval-<stage>.json` for a stage of a multi-stage job) the report: task,
    where the labels came from, row counts, metrics and per-class metrics. A multi-stage output is scored
    one stage at a time: `stage` names it (it may be left out when only one stage is written)."""
    out = OutputDir(output)
    if not out.exists():
        raise OutputError(f"{output!r} does not exist; pass the output.uri of an inference job")
    manifest = out.read_manifest()
    if manifest is None:
        raise OutputError(
            f"{output!r} has no _manifest.json: it is not an output of `shardwise run`; evaluate reads "
            "shardwise inference outputs"
        )
    if manifest.get("kind") != "inference":
        raise OutputError(
            f"{output!r} is the output of a {manifest.get('kind')} job; evaluate scores the predictions of an "
            "inference job (run one with the fine-tuned model first)"
        )
    spec = manifest.get("spec") or {}
    stage_spec, stage_name = _pick_stage(spec.get("stages") or [{}], stage)
    task = task or stage_spec.get("task")
    if task not in METRICS:
        raise MetricsError(
            f"task {task!r} has no metrics; tasks with metrics: {', '.join(sorted(METRICS))} (--task names "
            "another task whose metrics fit the output's fields)"
        )
    job_input = input_spec(spec.get("input") or {}, uri=None)
    kept = job_input.kept_as()  # input column → output name
    id_out = kept.get(job_input.id_column, job_input.id_column) if job_input.id_column else "id"

    predictions = read_output(output)
    if stage_name is not None:  # a multi-stage output: the stage's struct column holds its fields
        fields = predictions.column(stage_name).combine_chunks().flatten()
        names = [f.name for f in predictions.schema.field(stage_name).type]
        predictions = pa.table(
            {
                **{c: predictions.column(c) for c in predictions.column_names if c not in _stage_names(spec)},
                **dict(zip(names, fields, strict=True)),
            }
        )
    rows_missing = read_errors(output).num_rows
    if id_out not in predictions.column_names:
        raise OutputError(
            f"the predictions in {output!r} have no id column {id_out!r}; was the output edited?"
        )
    # What to fetch: the labels, and for token classification the text the tags refer to.
    asked = labels
    if labels not in kept and labels in kept.values() and input_uri is None:
        labels = next(c for c, name in kept.items() if name == labels)  # the kept column's output name
    wanted: dict[str, str | None] = {labels: "required"}
    text_column = stage_spec.get("inputs", {}).get("text") if task == "token-classification" else None
    if text_column:
        wanted[text_column] = None
    from_output = {c: kept[c] for c in wanted if c in kept and input_uri is None}
    labels_from = "output"
    joined: dict[str, list[Any]] = {
        c: predictions.column(name).to_pylist() for c, name in from_output.items()
    }
    rows_unmatched = 0
    keep_rows = list(range(predictions.num_rows))
    missing_cols = {c: need for c, need in wanted.items() if c not in from_output}
    if missing_cols:
        spec_in = job_input if input_uri is None else input_spec(spec.get("input") or {}, uri=input_uri)
        try:
            by_id, source = _read_input_columns(spec_in, missing_cols)
        except ShardwiseError:
            if labels in missing_cols:
                raise
            by_id, source = {}, ""  # only the text was wanted: tag references will say they need it
        ids = [str(v) for v in predictions.column(id_out).to_pylist()]
        if labels in missing_cols:
            labels_from = f"input {source}"
            keep_rows = [i for i, row_id in enumerate(ids) if row_id in by_id]
            rows_unmatched = len(ids) - len(keep_rows)
            if not keep_rows:
                raise OutputError(
                    f"no prediction's id ({id_out!r}) is an id of the input {source!r}; pass the input the job "
                    "read (--input), or set input.id_column in the job so rows join by a real id"
                )
        none = (None,) * len(missing_cols)
        for k, col in enumerate(missing_cols):
            joined[col] = [by_id.get(ids[i], none)[k] for i in keep_rows]
        for col in from_output:
            joined[col] = [joined[col][i] for i in keep_rows]
    rows = predictions.take(pa.array(keep_rows, pa.int64())).to_pylist()
    texts = joined.get(text_column) if text_column else None
    result = score(task, rows, joined[labels], label_names=label_names, texts=texts)
    per_class = result.pop("per_class", None)
    counts = {k: result.pop(k) for k in ("rows_scored", "rows_missing", "rows_unlabelled")}
    report = {
        "task": task,
        "output": output,
        "labels": asked,
        "labels_from": labels_from,
        "stage": stage_name,
        "state": manifest.get("state"),
        "rows_scored": counts["rows_scored"],
        "rows_missing": rows_missing + counts["rows_missing"],
        "rows_unlabelled": counts["rows_unlabelled"],
        "rows_unmatched": rows_unmatched,
        "metrics": result,
        "per_class": per_class,
        "evaluated_at": time.time(),
    }
    if write:
        out.write_bytes(eval_file(stage_name), json.dumps(report, indent=1, sort_keys=True).encode())
    return report


def eval_file(stage: str | None) -> str:
    """Where the report goes in the output: `_metrics/eval.json`, or `_metrics/eval-<stage>.json`."""
    return EVAL_FILE if stage is None else f"_metrics/eval-{stage}.json"


def _stage_names(spec: dict[str, Any]) -> set[str]:
    return {str(s.get("name")) for s in spec.get("stages") or [] if isinstance(s, dict)}


def _pick_stage(stages: list[dict[str, Any]], name: str | None) -> tuple[dict[str, Any], str | None]:
    """(the stage's spec, its struct column name or None for a single-stage output)."""
    if len(stages) < 2:
        if name is not None and name != stages[0].get("name"):
            raise SpecError("--stage", f"the job has one stage, {stages[0].get('name')!r}; leave --stage out")
        return stages[0], None
    written = [s for s in stages if s.get("output", True)]
    if name is None:
        if len(written) != 1:
            raise SpecError(
                "--stage",
                f"the job has {len(stages)} stages; name the one to score: "
                + ", ".join(f"{s.get('name')} ({s.get('task')})" for s in written),
            )
        return written[0], str(written[0].get("name"))
    for s in written:
        if s.get("name") == name:
            return s, name
    raise SpecError(
        "--stage",
        f"no written stage is named {name!r}; the output's stages: {[s.get('name') for s in written]}",
    )


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(report: dict[str, Any]) -> str:
    """A short text table: counts, overall metrics, then per class."""
    lines = [
        f"{report['task']} on {report['output']}, labels {report['labels']!r} from the {report['labels_from']}",
        f"rows scored {report['rows_scored']}, without a prediction (error records) {report['rows_missing']}, "
        f"unlabelled {report['rows_unlabelled']}, not found in the input {report['rows_unmatched']}",
    ]
    if report.get("state") not in (None, "succeeded"):
        lines.append(f"note: the output is {report['state']}: only its committed shards are scored")
    width = max(len(k) for k in report["metrics"])
    lines += [f"  {k:<{width}}  {_num(v)}" for k, v in report["metrics"].items()]
    per_class = report.get("per_class") or {}
    if per_class:
        cols = list(next(iter(per_class.values())))
        name_w = min(max(5, *(len(str(c)) for c in per_class)), 30)
        lines.append(f"  {'class':<{name_w}}  " + "  ".join(f"{c:>9}" for c in cols))
        for name, values in list(per_class.items())[:_TABLE_CLASSES]:
            lines.append(f"  {str(name)[:30]:<{name_w}}  " + "  ".join(f"{_num(values[c]):>9}" for c in cols))
        if len(per_class) > _TABLE_CLASSES:
            lines.append(
                f"  ... {len(per_class) - _TABLE_CLASSES} more classes in {eval_file(report.get('stage'))}"
            )
    return "\n".join(lines)
