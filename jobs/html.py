"""Small helpers for the self-contained HTML pages of `shardwise report` and `shardwise preview`.

Everything a page shows travels inside it: plots are inline SVG made with matplotlib (Agg backend, text
kept as text so a browser can search it), images are base64 `data:` URIs, audio a base64 WAV. Nothing is
fetched from the network when the page is opened.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CSS",
    "Raw",
    "bar_plot",
    "esc",
    "hist_plot",
    "line_plot",
    "page",
    "png_uri",
    "svg_of",
    "table",
    "wav_uri",
]

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 16px 24px; color: #1d2330; background: #fafbfc; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #dde;
     padding-bottom: 4px; } h3 { font-size: 15px; margin: 16px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 12px; background: #fff; }
th, td { border: 1px solid #dde; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f6; font-weight: 600; } table.kv td.num { text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #667; } .state-succeeded { color: #17803d; } .state-failed { color: #b42318; }
.state-interrupted, .state-partial, .state-incomplete, .state-running { color: #b54708; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plot { background: #fff; border: 1px solid #dde; }
.plot svg { display: block; width: 420px; height: auto; }
.row { background: #fff; border: 1px solid #dde; border-radius: 6px; margin: 12px 0; padding: 8px 12px; }
.row > .rowid { font-weight: 600; margin-bottom: 6px; } .stages { display: flex; flex-wrap: wrap; gap: 12px; }
.stage { flex: 1 1 300px; min-width: 260px; overflow-wrap: anywhere; border-left: 3px solid #8aa4d6; padding: 2px 10px; }
.stage > .stagename { font-weight: 600; color: #33415c; margin-bottom: 4px; }
.side { display: flex; gap: 10px; flex-wrap: wrap; } .side > div { flex: 1 1 140px; min-width: 0; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f7f9; padding: 6px 8px; border-radius: 4px; }
mark { border-radius: 3px; padding: 0 2px; } mark .tag { font-size: 10px; font-weight: 700; margin-left: 3px;
       color: #333; } mark.answer { background: #ffe58a; }
.bar { display: flex; align-items: center; gap: 6px; margin: 2px 0; font-size: 13px; }
.bar .lab { flex: 0 1 140px; min-width: 40px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.bar .track { flex: 1 1 200px; max-width: 200px; min-width: 40px; height: 12px; background: #eef; border-radius: 2px; }
.bar > span:last-child { flex: none; white-space: nowrap; }
.bar .fill { height: 12px; background: #4c78a8; border-radius: 2px; }
img.pic, svg.pic { width: 100%; max-width: 360px; height: auto; border: 1px solid #ccd; display: block; }
img.pic { image-rendering: pixelated; }
ul.objects { list-style: none; padding: 0; margin: 4px 0; font-size: 12px; }
ul.objects li { display: inline-block; margin-right: 8px; }
.legend span { display: inline-block; margin-right: 10px; font-size: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 3px; vertical-align: middle; }
pre.err { white-space: pre-wrap; max-height: 8em; overflow: auto; margin: 0; font-size: 12px; }
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(value if isinstance(value, str) else str(value), quote=True)


def page(title: str, body: str) -> str:
    """A whole HTML document: no scripts, no external resources."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]], *, cls: str = "") -> str:
    """A table (no header row when `header` is None); numbers are right-aligned, cells are escaped unless
    they are `Raw`."""
    out = [f'<table class="{esc(cls)}">']
    if header is not None:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, Raw):
                cells.append(f"<td>{v.html}</td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{esc(_num(v))}</td>')
            else:
                cells.append(f"<td>{esc('' if v is None else v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


class Raw:
    """Markup a table cell takes as it is."""

    def __init__(self, markup: str) -> None:
        self.html = markup


def _num(v: float) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.1f}"


# --- plots --------------------------------------------------------------------------------------------------


def _figure(title: str, width: float = 5.2, height: float = 2.8) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=96)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def svg_of(fig: Any) -> str:
    """The figure as an inline <svg> (text kept as text), in a `.plot` box; the figure is closed."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "shardwise"}):
        fig.tight_layout()
        fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return f'<div class="plot">{text[text.index("<svg") :]}</div>'


def bar_plot(
    title: str, labels: Sequence[str], values: Sequence[float], *, xlabel: str = "", horizontal: bool = True
) -> str:
    """Bars of `values` named by `labels` (horizontal: names read easily), as inline SVG."""
    labels = [str(x) if len(str(x)) <= 28 else str(x)[:27] + "…" for x in labels]
    height = max(2.2, 0.9 + 0.24 * len(labels)) if horizontal else 2.8
    fig, ax = _figure(title, height=min(height, 9.0))
    if horizontal:
        pos = list(range(len(labels)))[::-1]
        ax.barh(pos, values, color="#4c78a8")
        ax.set_yticks(pos, labels)
        ax.set_xlabel(xlabel, fontsize=8)
    else:
        ax.bar(range(len(labels)), values, color="#4c78a8")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_ylabel(xlabel, fontsize=8)
    return svg_of(fig)


def hist_plot(
    title: str, values: Sequence[float], *, xlabel: str = "", bins: int = 30, log: bool = False
) -> str:
    """A histogram of `values`, as inline SVG."""
    fig, ax = _figure(title)
    ax.hist(list(values), bins=bins, color="#4c78a8", log=log)
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("rows", fontsize=8)
    return svg_of(fig)


def line_plot(
    title: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str = "",
    ylabel: str = "",
    step: bool = False,
) -> str:
    """One line per named (x, y) series, as inline SVG."""
    fig, ax = _figure(title)
    for name, (x, y) in series.items():
        if step:
            ax.step(list(x), list(y), where="post", label=name)
        else:
            ax.plot(list(x), list(y), label=name, marker="." if len(x) < 40 else None)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return svg_of(fig)


# --- media ------------------------------------------------------------------------------------------------


def png_uri(image: Any, *, max_side: int | None = None) -> str:
    """A PIL image (or an HxWx3/HxW uint8 array) as a `data:image/png;base64,...` URI, downscaled so that
    its longer side is at most `max_side` pixels."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def wav_uri(samples: Any, rate: int) -> str:
    """Mono float samples as a 16-bit `data:audio/wav;base64,...` URI."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
