"""`shardwise report OUT [-o report.html]`: one self-contained HTML page about a job's output.

What it shows, from what the output holds (nothing is recomputed, no model is loaded):

- the job summary: state (as `shardwise status` finds it), reason, stages, counts, runs (manifest, commit
  records, `_runs/`);
- rows per stage: reached, passed, failed (`pipeline.status.stage_counts`);
- the error breakdown by stage, step and type, with a few error records of each kind (`_errors/`);
- the output's distributions per written stage, by task: labels and scores (classifiers), entity types
  (token classification), answer lengths and scores (QA), generated lengths and finish reasons, summary and
  translation lengths, detections per image and their classes, segments and their labels, depth ranges,
  transcript lengths; any other task gets its label-like and numeric fields;
- runtime, when the run recorded metrics (`_metrics/runtime/<run_id>/`): rows/s over time per stage,
  micro-batch latency, replica busy share, padding efficiency, rows waiting between stages, time to the
  first committed shard. Older outputs, and runs with metrics off, get a line saying none were recorded.
- for a fine-tune: the model files and the per-epoch losses and scores of `train_metrics.json`.

It works on any state (succeeded, failed, interrupted, running, incomplete) and reads parts one at a time, so
memory stays at one part's size.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.evaluate import input_spec
from jobs.html import Raw, bar_plot, esc, hist_plot, line_plot, page, svg_of, table
from pipeline import metrics
from pipeline.commit import ERRORS, OutputDir, read_errors
from pipeline.errors import OutputError
from pipeline.status import output_status

__all__ = ["build_report", "write_report"]

# Sample error records shown per (stage, step, error type), and in all.
_SAMPLES_PER_KIND = 3
_SAMPLES_MAX = 15
# Bars in a label/class chart (the rest are summed as "other").
_TOP = 20
_CLASSIFIERS = ("text-classification", "image-classification", "audio-classification")


def write_report(
    output: str, out_file: str, *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the report of `output` to the local file `out_file`; returns {state, plots, bytes}."""
    html, facts = build_report(output, storage_options=storage_options)
    with open(out_file, "w", encoding="utf-8") as f:
        f.write(html)
    return {**facts, "bytes": len(html.encode())}


def build_report(output: str, *, storage_options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(the report page, {state, plots}) for the shardwise output at `output`. Raises OutputError for a
    folder that is not one."""
    out = OutputDir(output, storage_options=storage_options)
    if not out.exists():
        raise OutputError(f"{output!r} does not exist; pass the output.uri of a shardwise job")
    info = output_status(output, storage_options=storage_options)
    manifest = out.read_manifest() or {}
    name = str(manifest.get("name") or output)
    sections = [f"<h1>shardwise report: {esc(name)}</h1>", _summary(output, manifest, info)]
    if manifest.get("kind") == "finetune":
        sections.append(_finetune_section(out))
        sections.append(_runtime_section(out, finetune=True))
    else:
        sections.append(_stages_section(manifest, info))
        sections.append(_runtime_section(out, finetune=False))
        sections.append(_errors_section(output, storage_options))
        sections.append(_outputs_section(out, manifest))
    sections.append(
        f'<p class="muted">generated {esc(time.strftime("%Y-%m-%d %H:%M:%S"))} by shardwise report</p>'
    )
    body = "\n".join(sections)
    return page(f"shardwise report: {name}", body), {"state": info["state"], "plots": body.count("<svg")}


# --- summary ----------------------------------------------------------------------------------------------


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t))) if t else "-"


def _summary(output: str, manifest: dict[str, Any], info: dict[str, Any]) -> str:
    spec = manifest.get("spec") or {}
    state = info["state"]
    rows: list[tuple[str, Any]] = [
        ("output", output),
        ("kind", manifest.get("kind")),
        ("state", Raw(f'<b class="state-{esc(state)}">{esc(state)}</b>')),
    ]
    if info.get("reason") and state in ("failed", "interrupted", "partial"):
        rows.append(("reason", info["reason"]))
    if info.get("holder"):
        rows.append(("held by", info["holder"]))
    if state in ("interrupted", "partial", "incomplete"):
        rows.append(
            ("next", "rerun the same job to resume: only shards without a commit record are computed")
        )
    rows.append(("input", (spec.get("input") or {}).get("uri")))
    if manifest.get("kind") != "finetune":
        rows += [
            ("rows planned", manifest.get("rows_total")),
            ("rows committed", int(info.get("rows_ok", 0)) + int(info.get("rows_error", 0))),
            ("rows ok", info.get("rows_ok")),
            ("rows in error", info.get("rows_error")),
            ("shards", f"{info.get('shards_done')}/{info.get('shards_total')} committed"),
            ("max error rate", manifest.get("max_error_rate")),
        ]
    rows += [("runs", info.get("runs")), ("last update", _when(manifest.get("updated_at")))]
    parts = ["<h2>Job</h2>", table(None, rows, cls="kv")]
    stages = spec.get("stages") or []
    parts.append(
        table(
            ["stage", "task", "model", "batch size", "replicas", "written"],
            [
                (
                    s.get("name"),
                    s.get("task"),
                    s.get("model"),
                    s.get("batch_size"),
                    json.dumps(s.get("replicas")),
                    "yes" if s.get("output", True) else "no",
                )
                for s in stages
                if isinstance(s, dict)
            ],
        )
    )
    runs = info.get("run_log") or []
    if runs:
        parts.append("<h3>Runs</h3>")
        parts.append(
            table(
                ["run", "started", "state", "shards run", "rows ok", "errors", "wall s", "rows/s"],
                [
                    (
                        r.get("run_id"),
                        _when(r.get("started") or r.get("finished_at")),
                        r.get("state"),
                        r.get("shards_run"),
                        r.get("rows_ok"),
                        r.get("rows_error"),
                        round(float(r.get("wall") or 0.0), 1),
                        _rate(r),
                    )
                    for r in runs
                ],
            )
        )
    problems = info.get("problems") or []
    if problems:
        parts.append("<h3>Problems</h3><ul>" + "".join(f"<li>{esc(p)}</li>" for p in problems[:20]) + "</ul>")
    return "\n".join(parts)


def _rate(run: dict[str, Any]) -> float | None:
    wall = float(run.get("wall") or 0.0)
    rows = run.get("rows_ok")
    if rows is None or wall <= 0:
        return None
    return (int(rows) + int(run.get("rows_error") or 0)) / wall


def _stages_section(manifest: dict[str, Any], info: dict[str, Any]) -> str:
    stages = info.get("stages") or {}
    if not stages:
        return ""
    parts = [
        "<h2>Rows per stage</h2>",
        table(
            ["stage", "rows in", "ok", "errors"],
            [(n, c["rows_in"], c["rows_ok"], c["rows_error"]) for n, c in stages.items()],
        ),
    ]
    if info.get("rows_error_read"):
        parts.append(f"<p>{info['rows_error_read']} row(s) could not be read and reached no stage.</p>")
    if len(stages) > 1:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.2, 0.9 + 0.35 * len(stages)), dpi=96)
        names = list(stages)[::-1]
        ok = [stages[n]["rows_ok"] for n in names]
        err = [stages[n]["rows_error"] for n in names]
        ax.barh(names, ok, color="#4c78a8", label="ok")
        ax.barh(names, err, left=ok, color="#e45756", label="error")
        ax.set_title("rows per stage", fontsize=10)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=8)
        parts.append(f'<div class="plots">{svg_of(fig)}</div>')
    return "\n".join(parts)


# --- errors -----------------------------------------------------------------------------------------------


def _errors_section(output: str, storage_options: dict[str, Any] | None) -> str:
    errors = read_errors(output, storage_options=storage_options)
    if errors.num_rows == 0:
        return "<h2>Errors</h2><p>No error records.</p>"
    rows = errors.to_pylist()
    kinds = Counter((r.get("stage") or "(read)", r.get("step"), r.get("error_type")) for r in rows)
    parts = [
        "<h2>Errors</h2>",
        f"<p>{len(rows)} error record(s) in <code>{ERRORS}/</code>.</p>",
        table(["stage", "step", "error type", "rows"], [(*k, n) for k, n in kinds.most_common()]),
        '<div class="plots">'
        + bar_plot(
            "error records by stage / step / type",
            [f"{s}/{st}/{t}" for s, st, t in list(kinds)[:_TOP]],
            [kinds[k] for k in list(kinds)[:_TOP]],
            xlabel="rows",
        )
        + "</div>",
    ]
    id_name = next((c for c in errors.column_names if c not in _ERROR_FIELDS), None)
    samples: list[dict[str, Any]] = []
    shown: Counter[tuple[Any, ...]] = Counter()
    for r in rows:
        key = (r.get("stage") or "(read)", r.get("step"), r.get("error_type"))
        if shown[key] < _SAMPLES_PER_KIND and len(samples) < _SAMPLES_MAX:
            shown[key] += 1
            samples.append(r)
    parts.append("<h3>Sample error records</h3>")
    parts.append(
        table(
            ["id", "input", "stage", "step", "type", "message"],
            [
                (
                    r.get(id_name) if id_name else None,
                    f"{r.get('input_file')}:{r.get('input_row')}",
                    r.get("stage") or "(read)",
                    r.get("step"),
                    r.get("error_type"),
                    Raw(f'<pre class="err">{esc(str(r.get("message"))[:1200])}</pre>'),
                )
                for r in samples
            ],
        )
    )
    return "\n".join(parts)


_ERROR_FIELDS = {"input_file", "input_row", "stage", "step", "error_type", "message"}


# --- output distributions ---------------------------------------------------------------------------------


@dataclass
class _Dist:
    """What one stage's outputs add up to: named counters (bar charts) and named values (histograms)."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    rows: int = 0

    def count(self, name: str, items: Any) -> None:
        self.counts.setdefault(name, Counter()).update(str(x) for x in items if x is not None)

    def add(self, name: str, items: Any) -> None:
        self.values.setdefault(name, []).extend(float(x) for x in items if x is not None)


def _flat(values: list[Any]) -> list[Any]:
    """Values that may be lists (num_return_sequences > 1, top_k > 1) as one flat list."""
    flat: list[Any] = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    return flat


def _words(text: Any) -> int | None:
    return len(text.split()) if isinstance(text, str) else None


def _collect(task: str, cols: dict[str, list[Any]], d: _Dist) -> None:
    """Add one part's fields (name → values) of a stage of `task` to `d`."""
    n = len(next(iter(cols.values()), []))
    d.rows += n
    if task in _CLASSIFIERS or (task not in _BY_TASK and "label" in cols):
        d.count("predicted label", cols.get("label", []))
        d.add("score of the predicted label", cols.get("score", []))
    elif task == "token-classification":
        ents = [e or [] for e in cols.get("entities", [])]
        d.add("entities per row", [len(e) for e in ents])
        d.count("entity type", [x.get("entity_group") or x.get("entity") for e in ents for x in e])
        d.add("entity score", [x.get("score") for e in ents for x in e])
    elif task == "question-answering":
        d.add("answer score", cols.get("score", []))
        d.add("answer length (characters)", [len(a) for a in cols.get("answer", []) if isinstance(a, str)])
    elif task == "text-generation":
        d.add("generated tokens", _flat(cols.get("num_generated_tokens", [])))
        d.count("finish reason", _flat(cols.get("finish_reason", [])))
        d.add("generated words", [_words(t) for t in _flat(cols.get("generated_text", []))])
    elif task == "summarization":
        d.add("summary length (words)", [_words(t) for t in cols.get("summary_text", [])])
    elif task == "translation":
        d.add("translation length (words)", [_words(t) for t in cols.get("translation_text", [])])
    elif task == "object-detection":
        objs = [o or [] for o in cols.get("objects", [])]
        d.add("detections per image", [len(o) for o in objs])
        d.count("detected class", [x.get("label") for o in objs for x in o])
        d.add("detection score", [x.get("score") for o in objs for x in o])
    elif task == "image-segmentation":
        segs = [s or [] for s in cols.get("segments", [])]
        d.add("segments per image", [len(s) for s in segs])
        d.count(
            "segment label (images holding it)", [lab for s in segs for lab in {x.get("label") for x in s}]
        )
    elif task == "depth-estimation":
        depths = [x for x in cols.get("depth", []) if isinstance(x, dict)]
        d.add("nearest depth per image (min)", [x.get("min") for x in depths])
        d.add("farthest depth per image (max)", [x.get("max") for x in depths])
    elif task == "automatic-speech-recognition":
        texts = cols.get("text", [])
        d.add("transcript length (words)", [_words(t) for t in texts])
        d.add("transcript length (characters)", [len(t) for t in texts if isinstance(t, str)])
    else:  # a plugin task: its label-like and numeric fields
        for name, values in cols.items():
            sample = next((v for v in values if v is not None), None)
            if isinstance(sample, (int, float)) and not isinstance(sample, bool):
                d.add(name, values)
            elif isinstance(sample, str) and len(set(values[:1000])) <= 50:
                d.count(name, values)


_BY_TASK = {
    "token-classification",
    "question-answering",
    "text-generation",
    "summarization",
    "translation",
    "object-detection",
    "image-segmentation",
    "depth-estimation",
    "automatic-speech-recognition",
    *_CLASSIFIERS,
}


def _part_names(out: OutputDir) -> list[str]:
    return sorted(n for n in out.sizes("") if n.startswith("part-") and n.endswith(".parquet"))


def _stage_columns(
    out: OutputDir, manifest: dict[str, Any], part: str
) -> Iterator[tuple[str, str, dict[str, list[Any]]]]:
    """(stage, task, {field: values}) of each written stage in one part."""
    stages = [s for s in (manifest.get("spec") or {}).get("stages") or [] if isinstance(s, dict)]
    with out.fs.open(out.path(part), "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if len(stages) == 1:
            kept = _kept_names(manifest)
            fields = [c for c in names if c not in kept]
            if fields:
                t = pf.read(columns=fields)
                yield (
                    str(stages[0].get("name")),
                    str(stages[0].get("task")),
                    {c: t.column(c).to_pylist() for c in fields},
                )
            return
        for s in stages:
            stage = str(s.get("name"))
            if stage not in names:
                continue
            col = pf.read(columns=[stage]).column(stage).combine_chunks()
            cols = {f.name: col.field(i).to_pylist() for i, f in enumerate(col.type)}
            yield stage, str(s.get("task")), cols


def _kept_names(manifest: dict[str, Any]) -> set[str]:
    """Output columns that hold input values, not predictions: the id and kept columns."""
    spec = input_spec((manifest.get("spec") or {}).get("input") or {"uri": ""}, uri=None)
    kept = set(spec.kept_as().values())
    return kept | {spec.kept_as().get(spec.id_column, spec.id_column) if spec.id_column else "id"}


def _outputs_section(out: OutputDir, manifest: dict[str, Any]) -> str:
    parts_ = _part_names(out)
    if not parts_:
        return "<h2>Predictions</h2><p>No part has been committed yet: there are no predictions to show.</p>"
    dists: dict[tuple[str, str], _Dist] = {}
    for part in parts_:
        for stage, task, cols in _stage_columns(out, manifest, part):
            _collect(task, cols, dists.setdefault((stage, task), _Dist()))
    sections = ["<h2>Predictions</h2>", f"<p>{len(parts_)} part file(s).</p>"]
    for (stage, task), d in dists.items():
        sections.append(f"<h3>stage {esc(stage)} ({esc(task)}): {d.rows:,} rows</h3>")
        plots, stats = [], []
        for name, counter in d.counts.items():
            if not counter:
                continue
            top = counter.most_common(_TOP)
            rest = sum(counter.values()) - sum(n for _, n in top)
            labels = [k for k, _ in top] + (["(other)"] if rest else [])
            counts = [n for _, n in top] + ([rest] if rest else [])
            plots.append(bar_plot(f"{stage}: {name}", labels, counts, xlabel="count"))
        for name, values in d.values.items():
            if not values:
                continue
            arr = np.asarray(values, dtype=np.float64)
            stats.append(
                (
                    name,
                    len(arr),
                    float(arr.mean()),
                    float(np.median(arr)),
                    float(np.percentile(arr, 95)),
                    float(arr.min()),
                    float(arr.max()),
                )
            )
            plots.append(
                hist_plot(f"{stage}: {name}", values, xlabel=name, bins=min(30, max(5, len(set(values)))))
            )
        if stats:
            sections.append(table(["", "n", "mean", "median", "p95", "min", "max"], stats))
        sections.append(
            '<div class="plots">' + "".join(plots) + "</div>" if plots else "<p>No predictions.</p>"
        )
    return "\n".join(sections)


# --- fine-tune --------------------------------------------------------------------------------------------


def _finetune_section(out: OutputDir) -> str:
    try:
        metrics = json.loads(out.read_bytes("train_metrics.json"))
    except (FileNotFoundError, ValueError):
        return "<h2>Training</h2><p>No train_metrics.json: the fine-tune has not finished an epoch.</p>"
    epochs = [e for e in metrics.get("epochs") or [] if isinstance(e, dict)]
    if not epochs:
        return "<h2>Training</h2><p>No epoch finished.</p>"
    keys = [k for k in epochs[0] if isinstance(epochs[0][k], (int, float)) and k != "epoch"]
    x = [float(e.get("epoch", i + 1)) for i, e in enumerate(epochs)]
    losses = {k: (x, [float(e.get(k) or np.nan) for e in epochs]) for k in keys if "loss" in k}
    scores = {
        k: (x, [float(e.get(k) or np.nan) for e in epochs])
        for k in keys
        if k.startswith("eval_") and "loss" not in k
    }
    plots = []
    if losses:
        plots.append(line_plot("loss per epoch", losses, xlabel="epoch"))
    if scores:
        plots.append(line_plot("eval scores per epoch", scores, xlabel="epoch"))
    best = {k: metrics[k] for k in ("best_epoch", "stopped_early") if k in metrics}
    return "\n".join(
        [
            "<h2>Training</h2>",
            f"<p>{esc(json.dumps(best))}</p>" if best else "",
            table(
                ["epoch", *keys],
                [(e.get("epoch", i + 1), *(e.get(k) for k in keys)) for i, e in enumerate(epochs)],
            ),
            '<div class="plots">' + "".join(plots) + "</div>",
        ]
    )


# --- runtime metrics --------------------------------------------------------------------------------------


def _runtime_section(out: OutputDir, *, finetune: bool) -> str:
    api = metrics
    runs = [] if finetune else api.list_runs(out)
    if not runs:
        return "<h2>Runtime</h2><p>No runtime metrics recorded for this run.</p>"
    summaries = {}
    for run_id in runs:
        summary = api.read_summary(out, run_id)
        if summary is None:  # a killed driver writes no summary
            events = api.read_events(out, run_id)
            if events is not None and events.num_rows:
                run = api.read_run(out, run_id)
                summary = {
                    "run_id": run_id,
                    "state": "ended without a summary",
                    **api.summarise(events, run=run),
                }
        if summary is not None:
            summaries[run_id] = summary
    parts = ["<h2>Runtime</h2>"]
    if summaries:
        parts.append(
            table(
                ["run", "state", "wall s", "rows run", "rows/s", "first shard committed after s"],
                [
                    (
                        r,
                        s.get("state"),
                        s.get("wall_s"),
                        s.get("rows_run"),
                        s.get("rows_per_s"),
                        s.get("first_commit_s"),
                    )
                    for r, s in summaries.items()
                ],
            )
        )
    run_id = runs[-1]
    events = api.read_events(out, run_id)
    summary = summaries.get(run_id) or {}
    parts.append(f"<h3>Run {esc(run_id)}</h3>")
    stages = summary.get("stages") or {}
    if stages:
        parts.append(
            table(
                [
                    "stage",
                    "task",
                    "rows/s",
                    "micro-batches",
                    "rows/batch",
                    "latency p50 s",
                    "latency p95 s",
                    "padding efficiency",
                    "replicas",
                    "busy share",
                    "max waiting for forward",
                    "max waiting for postprocess",
                ],
                [
                    (
                        name,
                        s.get("task"),
                        s.get("rows_per_s"),
                        (s.get("forward") or {}).get("micro_batches"),
                        (s.get("forward") or {}).get("rows_per_batch_mean"),
                        ((s.get("forward") or {}).get("latency_s") or {}).get("p50"),
                        ((s.get("forward") or {}).get("latency_s") or {}).get("p95"),
                        (s.get("forward") or {}).get("padding_efficiency"),
                        s.get("replicas"),
                        s.get("busy_share"),
                        (s.get("waiting_max") or {}).get("forward"),
                        (s.get("waiting_max") or {}).get("postprocess"),
                    )
                    for name, s in stages.items()
                ],
            )
        )
    if events is None or events.num_rows == 0:
        parts.append("<p>This run recorded no events.</p>")
        return "\n".join(parts)
    # x axes count from the run's start (as "first shard committed after s" does), Ray's start-up included
    run_info = api.read_run(out, run_id) or {}
    t0 = float(run_info.get("started_at") or _min(events.column("t_start")))
    bin_s = _bin_seconds(events)
    plots = [
        _throughput_plot(api.rates(events, bin_s=bin_s), t0, bin_s),
        _latency_plot(events),
        _busy_plot(stages),
        _padding_plot(stages),
        _queue_plot(api.queue_depth(events), t0),
    ]
    parts.append('<div class="plots">' + "".join(p for p in plots if p) + "</div>")
    return "\n".join(parts)


def _min(column: Any) -> float:
    import pyarrow.compute as pc

    return float(pc.min(column).as_py())


def _bin_seconds(events: pa.Table) -> float:
    """About 40 bins over the run, at least 1 s each."""
    import pyarrow.compute as pc

    span = float(pc.max(pc.add(events.column("t_start"), events.column("seconds"))).as_py()) - _min(
        events.column("t_start")
    )
    return max(1.0, round(span / 40.0, 1))


def _throughput_plot(rates: pa.Table, t0: float, bin_s: float) -> str:
    """Rows/s per bin of each stage's forward and of commits; a bin with no rows is drawn as 0 (commits come
    a shard at a time: without the zeros, a line through the busy bins alone would look steady)."""
    per: dict[str, dict[float, float]] = {}
    for r in rates.to_pylist():
        if r["step"] == "forward" or r["step"] == "commit":
            name = f"{r['stage']} (forward)" if r["step"] == "forward" else "committed"
            per.setdefault(name, {})[float(r["t"])] = float(r["rows_per_s"])
    if not per:
        return ""
    first = min(min(v) for v in per.values())
    last = max(max(v) for v in per.values())
    grid = [first + i * bin_s for i in range(int(round((last - first) / bin_s)) + 1)]
    series: dict[str, tuple[list[float], list[float]]] = {
        name: (
            [t - t0 for t in grid],
            [next((v for k, v in values.items() if abs(k - t) < bin_s / 2), 0.0) for t in grid],
        )
        for name, values in per.items()
    }
    return line_plot("throughput over time", series, xlabel="seconds since the run started", ylabel="rows/s")


def _latency_plot(events: pa.Table) -> str:
    import matplotlib.pyplot as plt

    fwd = [e for e in events.select(["stage", "step", "seconds"]).to_pylist() if e["step"] == "forward"]
    if not fwd:
        return ""
    by_stage: dict[str, list[float]] = {}
    for e in fwd:
        by_stage.setdefault(str(e["stage"]), []).append(float(e["seconds"]) * 1000.0)
    fig, ax = plt.subplots(figsize=(5.2, 2.8), dpi=96)
    ax.hist(list(by_stage.values()), bins=30, label=list(by_stage), histtype="stepfilled", alpha=0.6)
    ax.set_title("micro-batch latency (forward)", fontsize=10)
    ax.set_xlabel("ms per micro-batch", fontsize=8)
    ax.set_ylabel("micro-batches", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7)
    return svg_of(fig)


def _busy_plot(stages: dict[str, Any]) -> str:
    labels, values = [], []
    for name, s in stages.items():
        for replica, share in sorted((s.get("replica_busy") or {}).items()):
            labels.append(f"{name} · {str(replica)[:8]}")
            values.append(float(share or 0.0))
    if not labels:
        return ""
    return bar_plot(
        "replica utilisation (busy share)", labels, values, xlabel="share of the active window in forward"
    )


def _padding_plot(stages: dict[str, Any]) -> str:
    labels, values = [], []
    for name, s in stages.items():
        eff = (s.get("forward") or {}).get("padding_efficiency")
        if eff is not None:
            labels.append(f"{name} ({s.get('unit') or 'units'})")
            values.append(float(eff))
    if not labels:
        return ""
    return bar_plot("padding efficiency (real / padded)", labels, values, xlabel="real units / padded units")


def _queue_plot(depth: pa.Table, t0: float) -> str:
    """Rows preprocessed and waiting for each stage's replica pool: a queue that stays full points at the
    stage that holds the job back."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in depth.to_pylist():
        if r["between"] != "forward":
            continue
        xs, ys = series.setdefault(str(r["stage"]), ([], []))
        xs.append(float(r["t"]) - t0)
        ys.append(float(r["rows"]))
    if not series:
        return ""
    return line_plot(
        "rows waiting for each stage's replicas",
        series,
        xlabel="seconds since the run started",
        ylabel="rows",
        step=True,
    )
