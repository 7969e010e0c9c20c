"""What every benchmark shares: the input texts, timing records, machine info, the table and the JSON file.

Rates are rows per second. Each system reports three figures, defined the same way for all of them:

    rows_per_s         rows / wall time of the whole job (startup included)
    steady_rows_per_s  rows / time while rows were flowing (startup excluded; how each system gets there
                       is in its docstring)
    startup_s          wall time − rows / steady_rows_per_s: everything that is not steady-state work
                       (process and model start, the first shard's pipeline fill, the final write)
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "SystemRun",
    "agreement",
    "build_texts",
    "format_table",
    "machine_info",
    "rt_review_pool",
    "summarize",
    "text_stats",
    "write_results",
]

# bench/results/, ignored by git: results are per machine and per run, never committed.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class SystemRun:
    """One timed run of one system over all rows."""

    name: str
    rows: int
    wall_s: float
    steady_rows_per_s: float
    labels: list[str] = field(repr=False, default_factory=list)  # one per input row, in input order
    scores: list[float] = field(repr=False, default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # per-system details (stage times, threads, ...)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def startup_s(self) -> float:
        if self.steady_rows_per_s <= 0:
            return self.wall_s
        return max(0.0, self.wall_s - self.rows / self.steady_rows_per_s)

    def figures(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "wall_s": round(self.wall_s, 3),
            "rows_per_s": round(self.rows_per_s, 2),
            "steady_rows_per_s": round(self.steady_rows_per_s, 2),
            "startup_s": round(self.startup_s, 3),
            "extra": self.extra,
        }


# -------------------------------------------------------------------------------------------------------
# Inputs


def rt_review_pool() -> list[str]:
    """Real Rotten Tomatoes review snippets (both splits of `infra.assets.write_rt_splits`, its defaults,
    in the shared asset cache: the same files `make assets` writes, so this is a no-op once fetched)."""
    import pyarrow.parquet as pq

    from infra.assets import asset_cache, write_rt_splits

    train, test = write_rt_splits(asset_cache() / "rt")
    return [t for path in (test, train) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]


def build_texts(pool: Sequence[str], n: int, *, seed: int, min_words: int = 5, max_words: int = 200) -> list[str]:
    """`n` texts whose word counts are drawn uniformly from [min_words, max_words], each made by
    concatenating reviews from `pool` (walked in a seeded shuffled order) and cutting at the target length.
    The same pool and seed give the same texts on every machine."""
    if not pool:
        raise ValueError("the review pool is empty; run `make assets` (python -m infra.assets fetch)")
    rng = random.Random(seed)
    words = [review.split() for review in pool]
    order: list[int] = []
    texts = []
    for _ in range(n):
        target = rng.randint(min_words, max_words)
        acc: list[str] = []
        while len(acc) < target:
            if not order:
                order = list(range(len(words)))
                rng.shuffle(order)
            acc.extend(words[order.pop()])
        texts.append(" ".join(acc[:target]))
    return texts


def text_stats(texts: Sequence[str], token_lengths: Sequence[int]) -> dict[str, Any]:
    n_words = [len(t.split()) for t in texts]
    return {
        "rows": len(texts),
        "words": {"min": min(n_words), "mean": round(statistics.fmean(n_words), 1), "max": max(n_words)},
        "tokens": {
            "min": min(token_lengths),
            "mean": round(statistics.fmean(token_lengths), 1),
            "max": max(token_lengths),
            "total": int(sum(token_lengths)),
        },
    }


# -------------------------------------------------------------------------------------------------------
# Results


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    """Share of rows with the same label (rows missing from either side count as disagreeing)."""
    if len(a) != len(b):
        raise ValueError(f"label lists differ in length: {len(a)} vs {len(b)}")
    if not a:
        return 1.0
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def summarize(runs: Sequence[SystemRun], *, reference: str) -> dict[str, dict[str, Any]]:
    """Per system: the median of each figure over its repeats, every repeat's figures, and the ratios of
    the medians to the `reference` system's."""
    by_name: dict[str, list[SystemRun]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)

    def med(rs: list[SystemRun], attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in rs)

    out: dict[str, dict[str, Any]] = {}
    for name, rs in by_name.items():
        out[name] = {
            "rows_per_s": round(med(rs, "rows_per_s"), 2),
            "steady_rows_per_s": round(med(rs, "steady_rows_per_s"), 2),
            "startup_s": round(med(rs, "startup_s"), 3),
            "wall_s": round(med(rs, "wall_s"), 3),
            "repeats": [r.figures() for r in rs],
        }
    ref = out.get(reference)
    for fig in out.values():
        for key in ("rows_per_s", "steady_rows_per_s"):
            ratio = fig[key] / ref[key] if ref and ref[key] > 0 else None
            fig[f"{key}_vs_{reference}"] = round(ratio, 3) if ratio is not None else None
    return out


def machine_info(*, device: str, torch_threads: int) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "device": device,
        "torch_threads": torch_threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover - ray is a dependency
        info["ray"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def write_results(payload: Mapping[str, Any], *, name: str, out_dir: Path | None = None) -> Path:
    """`<out_dir>/<name>-<timestamp>.json` (default out_dir: bench/results); returns its path."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    n = 1
    while path.exists():  # two runs in the same second keep both files
        path = out_dir / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{n}.json"
        n += 1
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def format_table(summary: Mapping[str, Mapping[str, Any]], *, reference: str,
                 agreement_vs_reference: Mapping[str, float]) -> str:
    """A fixed-width table: one line per system, figures as medians over repeats."""
    head = (f"{'system':<16}{'rows/s':>10}{'steady rows/s':>15}{'startup s':>11}{'wall s':>9}"
            f"{'x ' + reference[:8] + ' (steady)':>22}{'x (whole job)':>15}{'agree':>8}")
    lines = [head, "-" * len(head)]
    for name, fig in summary.items():
        ratio = fig.get(f"steady_rows_per_s_vs_{reference}")
        ratio_all = fig.get(f"rows_per_s_vs_{reference}")
        agree = agreement_vs_reference.get(name)
        lines.append(
            f"{name:<16}{fig['rows_per_s']:>10.1f}{fig['steady_rows_per_s']:>15.1f}{fig['startup_s']:>11.2f}"
            f"{fig['wall_s']:>9.2f}{_fmt(ratio, 'x'):>22}{_fmt(ratio_all, 'x'):>15}"
            f"{(f'{agree:.2%}' if agree is not None else '-'):>8}"
        )
    return "\n".join(lines)


def _fmt(value: float | None, unit: str) -> str:
    return f"{value:.2f}{unit}" if value is not None else "-"
