"""`shardwise preview OUT --n 24 [--sample] [-o preview.html]`: predictions as a person looks at them.

The first N rows of the output (or a seeded random sample of N) in one self-contained HTML page, each
row a card with one panel per written stage, side by side:

    object-detection              the image with each box and its label drawn over it (SVG: labels are text)
    image-segmentation            the image with each segment's mask overlaid in a colour, and a legend
    depth-estimation              the image and the colour-mapped depth map beside it
    image/text/audio-classification  top-k bars (label, score), next to the image / text / audio player
    token-classification          the text with each entity span highlighted and tagged with its type
    question-answering            the question, and the answer marked in its context
    text-generation, summarization, translation   the source beside the generated text
    automatic-speech-recognition  an audio player (WAV, inline) and the transcript (with its chunks)
    any other task                its fields as JSON

Inputs are read back from the job's input (the manifest records it; storage options are never written, so
pass them again with `--storage-options`) by row id: by the id column when the job had one, else by the
default id `<file>:<row>`, which says where the row is. A stage input that names an earlier stage's field
(`<stage>.<field>`) is taken from the output row. Images and audio are decoded by the tasks' own loaders
(`models.images.load_image`, `models.audio.load_audio`).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.evaluate import input_spec
from jobs.html import esc, page, png_uri, wav_uri
from models.audio import load_audio
from models.depth_estimation import decode_depth
from models.images import load_image
from models.masks import decode_mask
from models.registry import RowError
from pipeline.block import ID, ROW
from pipeline.commit import OutputDir, read_errors
from pipeline.errors import OutputError, SpecError
from pipeline.sources import list_fragments, read_range, resolve_format
from pipeline.spec import stage_reference

__all__ = ["build_preview", "write_preview"]

# Longest side of an image as embedded (the page shows it at most 360 px wide).
_MAX_SIDE = 480
# Text shown per field (longer text is cut, with a note).
_MAX_TEXT = 3000
# Audio embedded per row (longer recordings are cut, with a note).
_MAX_AUDIO_S = 30.0
_AUDIO_RATE = 16_000
_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 190),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
]


def write_preview(
    output: str,
    out_file: str,
    *,
    n: int = 24,
    sample: bool = False,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the preview of `output` to the local file `out_file`; returns {rows, images, audio, bytes}."""
    html, facts = build_preview(output, n=n, sample=sample, seed=seed, storage_options=storage_options)
    with open(out_file, "w", encoding="utf-8") as f:
        f.write(html)
    return {**facts, "bytes": len(html.encode())}


@dataclasses.dataclass(frozen=True)
class _Stage:
    name: str
    task: str
    inputs: dict[str, str]  # task input → input column or <stage>.<field>
    params: dict[str, Any]
    written: bool


def build_preview(
    output: str,
    *,
    n: int = 24,
    sample: bool = False,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(the preview page, {rows, images, audio}) of the inference output at `output`."""
    if n < 1:
        raise SpecError("--n", f"must be a positive number of rows, got {n}")
    out = OutputDir(output, storage_options=storage_options)
    if not out.exists():
        raise OutputError(f"{output!r} does not exist; pass the output.uri of a shardwise inference job")
    manifest = out.read_manifest()
    if manifest is None:
        raise OutputError(
            f"{output!r} has no _manifest.json: it is not a shardwise output (or the job never started)"
        )
    if manifest.get("kind") != "inference":
        raise OutputError(
            f"{output!r} is the output of a {manifest.get('kind')} job; preview shows the predictions of an "
            "inference job"
        )
    spec = manifest.get("spec") or {}
    stages = _stages(spec)
    job_input = _job_input(spec, storage_options)
    kept = job_input.kept_as()
    id_out = kept.get(job_input.id_column, job_input.id_column) if job_input.id_column else "id"
    rows = _pick_rows(out, n=n, sample=sample, seed=seed)
    notes: list[str] = []
    inputs = _read_inputs(job_input, rows, stages, id_out=id_out, kept=kept, notes=notes)
    single = len(stages) == 1
    cards = []
    for i, row in enumerate(rows):
        values = inputs[i]
        panels = []
        for st in stages:
            if not st.written:
                continue
            fields = (
                {k: v for k, v in row.items() if k not in kept.values() and k != id_out}
                if single
                else row.get(st.name)
            )
            if not isinstance(fields, Mapping):
                continue
            stage_inputs = {name: _source_value(src, row, values, stages) for name, src in st.inputs.items()}
            panels.append(
                f'<div class="stage" data-stage="{esc(st.name)}" data-task="{esc(st.task)}">'
                f'<div class="stagename">{esc(st.name)} <span class="muted">({esc(st.task)})</span></div>'
                f"{_render(st, dict(fields), stage_inputs, storage_options)}</div>"
            )
        cards.append(
            f'<div class="row" data-id="{esc(row.get(id_out))}"><div class="rowid">row {esc(row.get(id_out))}</div>'
            f'<div class="stages">{"".join(panels)}</div></div>'
        )
    errors = read_errors(output, storage_options=storage_options).num_rows
    name = str(manifest.get("name") or output)
    how = f"a random sample (seed {seed}) of {len(rows)}" if sample else f"the first {len(rows)}"
    head = [
        f"<h1>shardwise preview: {esc(name)}</h1>",
        f"<p>{how} predicted rows of <code>{esc(output)}</code> (state recorded: {esc(manifest.get('state'))}; "
        f"{manifest.get('rows_ok', 0):,} rows ok, {errors:,} error records, which have no prediction to show: "
        "see <code>shardwise report</code>).</p>",
        *(f'<p class="muted">note: {esc(x)}</p>' for x in notes),
    ]
    if not rows:
        head.append("<p>No part has been committed yet: there are no predictions to show.</p>")
    body = "\n".join(head + cards)
    facts = {
        "rows": len(rows),
        "images": body.count("<img") + body.count("<image"),
        "audio": body.count("<audio"),
    }
    return page(f"shardwise preview: {name}", body), facts


def _stages(spec: dict[str, Any]) -> list[_Stage]:
    return [
        _Stage(
            name=str(s.get("name")),
            task=str(s.get("task")),
            inputs={str(k): str(v) for k, v in (s.get("inputs") or {}).items()},
            params=dict(s.get("params") or {}),
            written=bool(s.get("output", True)),
        )
        for s in spec.get("stages") or []
        if isinstance(s, dict)
    ]


def _job_input(spec: dict[str, Any], storage_options: dict[str, Any] | None) -> Any:
    base = input_spec(spec.get("input") or {"uri": ""}, uri=None)
    return dataclasses.replace(base, storage_options=dict(storage_options or {}))


# --- which rows -------------------------------------------------------------------------------------------


def _pick_rows(out: OutputDir, *, n: int, sample: bool, seed: int) -> list[dict[str, Any]]:
    """The first `n` rows in part order, or `n` rows drawn uniformly (seeded) from all parts."""
    parts = sorted(x for x in out.sizes("") if x.startswith("part-") and x.endswith(".parquet"))

    def read(name: str) -> pa.Table:
        with out.fs.open(out.path(name), "rb") as f:
            return pq.read_table(f)

    if not sample:
        rows: list[dict[str, Any]] = []
        for name in parts:
            rows += read(name).slice(0, n - len(rows)).to_pylist()
            if len(rows) >= n:
                break
        return rows
    counts = []
    for name in parts:
        with out.fs.open(out.path(name), "rb") as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    total = sum(counts)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    picked, start = [], 0
    for name, count in zip(parts, counts, strict=True):
        local = [int(i) - start for i in chosen if start <= i < start + count]
        if local:
            picked += read(name).take(pa.array(local, pa.int64())).to_pylist()
        start += count
    return picked


# --- inputs by row id -------------------------------------------------------------------------------------


def _read_inputs(
    job_input: Any,
    rows: list[dict[str, Any]],
    stages: list[_Stage],
    *,
    id_out: str,
    kept: dict[str, str],
    notes: list[str],
) -> list[dict[str, Any]]:
    """Per row, {input column: value} for every input column a stage reads: from the output when the job
    kept the column, else from the job's input, found by row id."""
    earlier: list[str] = []
    columns: list[str] = []
    for st in stages:
        for src in st.inputs.values():
            if stage_reference(src, earlier) is None and src not in columns:
                columns.append(src)
        earlier.append(st.name)
    values: list[dict[str, Any]] = [
        {c: row[kept[c]] for c in columns if c in kept and kept[c] in row} for row in rows
    ]
    wanted = [c for c in columns if c not in kept]
    if not wanted or not rows:
        return values
    ids = [str(row.get(id_out)) for row in rows]
    try:
        found = _rows_by_id(job_input, set(ids), wanted)
    except Exception as e:  # noqa: BLE001 - the predictions are still worth showing without their inputs
        notes.append(
            f"the job's input {job_input.uri!r} could not be read ({type(e).__name__}: {e}); inputs are not shown "
            "(pass --storage-options for remote input)"
        )
        return values
    missing = 0
    for i, row_id in enumerate(ids):
        if row_id in found:
            values[i].update(found[row_id])
        else:
            missing += 1
    if missing:
        notes.append(f"{missing} row(s) were not found in the input {job_input.uri!r} (was it changed?)")
    return values


def _rows_by_id(job_input: Any, ids: set[str], columns: list[str]) -> dict[str, dict[str, Any]]:
    """{row id: {column: value}} for the rows of `ids`. A default id `<file>:<row>` names its row; with an
    id column, only that column is scanned, and then just the rows found are read."""
    spec = resolve_format(job_input)
    fragments = list_fragments(spec)
    where: dict[str, list[int]] = {}
    if spec.id_column is None:
        by_rel = {f.rel: f for f in fragments}
        for row_id in ids:
            rel, _, row = row_id.rpartition(":")
            if rel in by_rel and row.isdigit():
                where.setdefault(rel, []).append(int(row))
    else:
        for frag in fragments:
            table = read_range(spec, frag, 0, frag.num_rows, columns=[])
            hits = [
                r
                for r, i in zip(table.column(ROW).to_pylist(), table.column(ID).to_pylist(), strict=True)
                if i in ids
            ]
            if hits:
                where[frag.rel] = hits
    found: dict[str, dict[str, Any]] = {}
    by_rel = {f.rel: f for f in fragments}
    for rel, rows in where.items():
        for start, stop in _runs(sorted(rows)):
            table = read_range(spec, by_rel[rel], start, stop, columns=columns)
            for rec in table.to_pylist():
                if rec[ID] in ids:
                    found[rec[ID]] = {c: rec.get(c) for c in columns}
    return found


def _runs(rows: Sequence[int], gap: int = 64) -> list[tuple[int, int]]:
    """Sorted row numbers as [start, stop) ranges, merging rows less than `gap` apart."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and r - out[-1][1] < gap:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def _source_value(src: str, row: dict[str, Any], values: dict[str, Any], stages: list[_Stage]) -> Any:
    ref = stage_reference(src, [s.name for s in stages])
    if ref is None:
        return values.get(src, _MISSING)
    stage, name = ref
    fields = row.get(stage)
    return fields.get(name, _MISSING) if isinstance(fields, Mapping) else _MISSING


class _Missing:
    def __repr__(self) -> str:
        return "(not available)"


_MISSING = _Missing()


# --- rendering --------------------------------------------------------------------------------------------


def _render(
    st: _Stage, fields: dict[str, Any], inputs: dict[str, Any], storage_options: dict[str, Any] | None
) -> str:
    task = st.task
    try:
        if task in ("text-classification", "image-classification", "audio-classification"):
            return _source_media(task, inputs, storage_options) + _bars(fields)
        if task == "token-classification":
            return _entities(inputs.get("text"), fields.get("entities") or [])
        if task == "question-answering":
            return _qa(inputs, fields)
        if task in ("text-generation", "summarization", "translation"):
            return _generated(task, inputs, fields)
        if task == "object-detection":
            return _detection(inputs.get("image"), fields.get("objects") or [], storage_options)
        if task == "image-segmentation":
            return _segmentation(inputs.get("image"), fields.get("segments") or [], storage_options)
        if task == "depth-estimation":
            return _depth(inputs.get("image"), fields.get("depth"), storage_options)
        if task == "automatic-speech-recognition":
            return _audio(inputs.get("audio"), storage_options) + _transcript(fields)
    except Exception as e:  # noqa: BLE001 - one row that cannot be drawn must not cost the page
        return (
            f'<p class="muted">cannot draw this prediction ({esc(type(e).__name__)}: {esc(e)})</p>'
            + _json(fields)
        )
    return _json(fields)


def _json(fields: dict[str, Any]) -> str:
    text = json.dumps(fields, default=_short, ensure_ascii=False, indent=1)
    return f'<pre class="text">{esc(_cut(text))}</pre>'


def _short(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return str(value)


def _cut(text: str, limit: int = _MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit:,} more characters)"


def _text_block(value: Any) -> str:
    if value is _MISSING or value is None:
        return '<div class="text muted">(input not available)</div>'
    if isinstance(value, list):  # a chat: list of {role, content}
        lines = [f"{m.get('role')}: {m.get('content')}" if isinstance(m, Mapping) else str(m) for m in value]
        value = "\n".join(lines)
    return f'<div class="text">{esc(_cut(str(value)))}</div>'


def _source_media(task: str, inputs: dict[str, Any], storage_options: dict[str, Any] | None) -> str:
    if task == "image-classification":
        image = _image(inputs.get("image"), storage_options)
        return (
            f'<img class="pic" alt="input image" src="{png_uri(image, max_side=_MAX_SIDE)}">'
            if image
            else _no_input()
        )
    if task == "audio-classification":
        return _audio(inputs.get("audio"), storage_options)
    pair = inputs.get("text_pair")
    return _text_block(inputs.get("text")) + (_text_block(pair) if pair not in (None, _MISSING) else "")


def _bars(fields: dict[str, Any]) -> str:
    scores = fields.get("scores")
    if not isinstance(scores, list) or not scores:
        scores = [{"label": fields.get("label"), "score": fields.get("score")}]
    out = ['<div class="bars">']
    for s in scores[:10]:
        score = float(s.get("score") or 0.0)
        out.append(
            f'<div class="bar"><span class="lab" title="{esc(s.get("label"))}">{esc(s.get("label"))}</span>'
            f'<span class="track"><div class="fill" style="width:{max(0.0, min(score, 1.0)) * 100:.1f}%"></div></span>'
            f"<span>{score:.3f}</span></div>"
        )
    return "".join(out) + "</div>"


def _colour(key: Any) -> tuple[int, int, int]:
    return _PALETTE[zlib.crc32(str(key).encode()) % len(_PALETTE)]


def _css(rgb: tuple[int, int, int], alpha: float = 1.0) -> str:
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha})"


def _entities(text: Any, entities: list[dict[str, Any]]) -> str:
    if not isinstance(text, str):
        spans = ", ".join(f"{e.get('word')} ({e.get('entity_group') or e.get('entity')})" for e in entities)
        return _text_block(text) + f"<p>entities: {esc(spans) or '(none)'}</p>"
    shown = text[:_MAX_TEXT]
    out, pos = [], 0
    for e in sorted(entities, key=lambda e: (int(e.get("start") or 0), -int(e.get("end") or 0))):
        start, end = int(e.get("start") or 0), int(e.get("end") or 0)
        if start < pos or end > len(shown) or end <= start:
            continue  # overlapping (strategy none on sub-tokens) or past the cut
        kind = str(e.get("entity_group") or e.get("entity"))
        out.append(esc(shown[pos:start]))
        out.append(
            f'<mark class="ent" data-type="{esc(kind)}" style="background:{_css(_colour(kind), 0.35)}" '
            f'title="{esc(kind)} {float(e.get("score") or 0):.3f}"><span class="span">{esc(shown[start:end])}</span>'
            f'<span class="tag">{esc(kind)}</span></mark>'
        )
        pos = end
    out.append(esc(shown[pos:]))
    cut = f" … ({len(text) - _MAX_TEXT:,} more characters)" if len(text) > _MAX_TEXT else ""
    count = f'<p class="muted">{len(entities)} entit{"y" if len(entities) == 1 else "ies"}</p>'
    return f'<div class="text">{"".join(out)}{esc(cut)}</div>{count}'


def _qa(inputs: dict[str, Any], fields: dict[str, Any]) -> str:
    question, context = inputs.get("question"), inputs.get("context")
    answer, start, end = fields.get("answer"), fields.get("start"), fields.get("end")
    head = f"<p><b>Q:</b> {esc(question if isinstance(question, str) else '(question not available)')}</p>"
    head += f'<p><b>A:</b> <span class="answer-text">{esc(answer)}</span> <span class="muted">(score {float(fields.get("score") or 0):.3f})</span></p>'
    if not isinstance(context, str) or start is None or end is None or not 0 <= start <= end <= len(context):
        return head + _text_block(context)
    lo, hi = max(0, int(start) - _MAX_TEXT // 2), min(len(context), int(end) + _MAX_TEXT // 2)
    before = ("… " if lo else "") + context[lo:start]
    after = context[end:hi] + (" …" if hi < len(context) else "")
    return head + (
        f'<div class="text">{esc(before)}<mark class="answer">{esc(context[start:end])}</mark>{esc(after)}</div>'
    )


def _generated(task: str, inputs: dict[str, Any], fields: dict[str, Any]) -> str:
    key = {
        "text-generation": "generated_text",
        "summarization": "summary_text",
        "translation": "translation_text",
    }[task]
    texts = fields.get(key)
    texts = texts if isinstance(texts, list) else [texts]
    source = inputs.get("messages", inputs.get("text")) if task == "text-generation" else inputs.get("text")
    if source is _MISSING and "messages" in inputs:
        source = inputs["messages"]
    extra = ""
    if task == "text-generation":
        reasons, tokens = fields.get("finish_reason"), fields.get("num_generated_tokens")
        extra = f'<p class="muted">{esc(tokens)} new token(s); finish reason {esc(reasons)}</p>'
    gen = "".join(f'<div class="text generated">{esc(_cut(str(t)))}</div>' for t in texts)
    return f'<div class="side"><div><b>source</b>{_text_block(source)}</div><div><b>{esc(key)}</b>{gen}</div></div>{extra}'


def _no_input() -> str:
    return '<p class="muted">(input not available)</p>'


def _image(value: Any, storage_options: dict[str, Any] | None) -> Any:
    """The decoded image, or None (missing input or one the task could not read either)."""
    if value is _MISSING or value is None:
        return None
    image = load_image(value, storage_options=storage_options)
    return None if isinstance(image, RowError) else image


def _detection(value: Any, objects: list[dict[str, Any]], storage_options: dict[str, Any] | None) -> str:
    image = _image(value, storage_options)
    items = "".join(f"<li>{esc(o.get('label'))} {float(o.get('score') or 0):.3f}</li>" for o in objects)
    listing = f'<ul class="objects">{items}</ul>' if objects else '<p class="muted">no detections</p>'
    if image is None:
        return _no_input() + listing
    w, h = image.size
    line, font = max(1.0, max(w, h) / 160), max(7.0, max(w, h) / 22)
    shapes = []
    for o in objects:
        box = o.get("box") or {}
        x0, y0, x1, y1 = (float(box.get(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        colour = _css(_colour(o.get("label")))
        label = f"{o.get('label')} {float(o.get('score') or 0):.2f}"
        ty = y0 - line if y0 - font > 0 else y0 + font
        shapes.append(
            f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{max(0.0, x1 - x0):.1f}" height="{max(0.0, y1 - y0):.1f}" '
            f'fill="none" stroke="{colour}" stroke-width="{line:.1f}"/>'
            f'<text class="box-label" x="{x0 + line:.1f}" y="{ty:.1f}" font-size="{font:.1f}" fill="{colour}" '
            f'stroke="black" stroke-width="{font / 12:.2f}" paint-order="stroke" font-family="sans-serif">{esc(label)}</text>'
        )
    svg = (
        f'<svg class="pic" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="360" '
        f'height="{360 * h / w:.0f}"><image href="{png_uri(image, max_side=_MAX_SIDE)}" x="0" y="0" '
        f'width="{w}" height="{h}"/>{"".join(shapes)}</svg>'
    )
    return svg + listing


def _segmentation(value: Any, segments: list[dict[str, Any]], storage_options: dict[str, Any] | None) -> str:
    image = _image(value, storage_options)
    legend = []
    base = np.asarray(image, dtype=np.float32) if image is not None else None
    for k, seg in enumerate(segments):
        colour = _PALETTE[k % len(_PALETTE)]
        score = seg.get("score")
        legend.append(
            f'<span class="seg"><i style="background:{_css(colour)}"></i>{esc(seg.get("label"))}'
            + (f" {float(score):.2f}" if score is not None else "")
            + "</span>"
        )
        if base is not None and seg.get("mask"):
            mask = decode_mask(seg["mask"])
            if mask.shape == base.shape[:2]:
                base[mask] = base[mask] * 0.45 + np.asarray(colour, np.float32) * 0.55
    legend_html = f'<div class="legend">{"".join(legend) or "no segments"}</div>'
    if base is None:
        return _no_input() + legend_html
    overlay = png_uri(base.clip(0, 255).astype(np.uint8), max_side=_MAX_SIDE)
    return f'<img class="pic" alt="segments over the image" src="{overlay}">{legend_html}'


def _depth(value: Any, depth: Any, storage_options: dict[str, Any] | None) -> str:
    import matplotlib

    if not isinstance(depth, Mapping):
        return _no_input()
    arr = decode_depth(depth)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    coloured = (matplotlib.colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)
    image = _image(value, storage_options)
    left = (
        f'<div><img class="pic" alt="input image" src="{png_uri(image, max_side=_MAX_SIDE)}"></div>'
        if image is not None
        else f"<div>{_no_input()}</div>"
    )
    right = (
        f'<div><img class="pic depth" alt="depth map" src="{png_uri(coloured, max_side=_MAX_SIDE)}"></div>'
    )
    return (
        f'<div class="side">{left}{right}</div><p class="muted">depth {lo:.3g} (dark) … {hi:.3g} (bright), '
        f"{arr.shape[1]}×{arr.shape[0]}</p>"
    )


def _audio(value: Any, storage_options: dict[str, Any] | None) -> str:
    if value is _MISSING or value is None:
        return _no_input()
    samples = load_audio(value, rate=_AUDIO_RATE, max_duration_s=None, storage_options=storage_options)
    if isinstance(samples, RowError):
        return f'<p class="muted">(audio not playable: {esc(samples.message)})</p>'
    seconds = samples.shape[0] / _AUDIO_RATE
    cut = samples[: int(_MAX_AUDIO_S * _AUDIO_RATE)]
    note = f" (first {_MAX_AUDIO_S:.0f} s)" if seconds > _MAX_AUDIO_S else ""
    return (
        f'<audio controls preload="metadata" src="{wav_uri(cut, _AUDIO_RATE)}"></audio>'
        f'<p class="muted">{seconds:.2f} s{note}</p>'
    )


def _transcript(fields: dict[str, Any]) -> str:
    out = f'<div class="text transcript">{esc(_cut(str(fields.get("text") or "")))}</div>'
    chunks = fields.get("chunks")
    if isinstance(chunks, list) and chunks:
        items = "".join(
            f"<li>{esc(c.get('timestamp'))}: {esc(c.get('text'))}</li>"
            for c in chunks[:50]
            if isinstance(c, Mapping)
        )
        out += f'<ul class="chunks">{items}</ul>'
    return out
