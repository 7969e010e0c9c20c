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
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CpuMeter",
    "RESULTS_DIR",
    "SystemRun",
    "agreement",
    "build_texts",
    "committed_shards",
    "format_table",
    "machine_info",
    "rt_review_pool",
    "steady_rate",
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
    # CPU seconds this process and all its descendants (the embedded Ray cluster) used during the run, and
    # the 1-minute load average when it started: on a shared machine, rows/s moves with other people's load
    # while rows per CPU-second does not.
    cpu_s: float | None = None
    load_1m: float | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def startup_s(self) -> float:
        if self.steady_rows_per_s <= 0:
            return self.wall_s
        return max(0.0, self.wall_s - self.rows / self.steady_rows_per_s)

    @property
    def rows_per_cpu_s(self) -> float | None:
        return self.rows / self.cpu_s if self.cpu_s else None

    def figures(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "wall_s": round(self.wall_s, 3),
            "rows_per_s": round(self.rows_per_s, 2),
            "steady_rows_per_s": round(self.steady_rows_per_s, 2),
            "startup_s": round(self.startup_s, 3),
            "cpu_s": _round(self.cpu_s, 2),
            "rows_per_cpu_s": _round(self.rows_per_cpu_s, 2),
            "load_1m": _round(self.load_1m, 2),
            "extra": self.extra,
        }


def _round(value: float | None, digits: int) -> float | None:
    return round(value, digits) if value is not None else None


class CpuMeter:
    """CPU seconds (user + system) used by this process and all its descendants while the meter runs.

        with CpuMeter() as meter:
            run()
        meter.cpu_s  # None where /proc is missing

    The embedded Ray cluster (GCS, raylet, workers) descends from the driver, so this is a whole job's CPU
    cost. Processes are sampled from /proc every `interval_s` and each one's last sample counts: a Ray
    worker that exits is reaped without its time reaching any parent's `cutime`, so reading totals only at
    the end would lose every actor that Ray Data shut down before then. A process that lives and dies
    between two samples is missed; one that dies loses at most `interval_s` of its time. A sample reads
    /proc/<pid>/stat of the tree only (plus each new pid once), so it stays cheap on a busy machine.
    """

    def __init__(self, *, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.cpu_s: float | None = None
        self._base: dict[tuple[int, str], int] = {}
        self._last: dict[tuple[int, str], int] = {}
        self._ours: set[int] = {os.getpid()}
        self._foreign: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CpuMeter:
        sample = self._sample()
        if sample is not None:
            self._base = dict(sample)
            self._last = dict(sample)
            self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample() or {})
        ticks = sum(t - self._base.get(k, 0) for k, t in self._last.items())
        self.cpu_s = ticks / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._last.update(self._sample() or {})

    def _sample(self) -> dict[tuple[int, str], int] | None:
        """{(pid, start time): utime + stime in clock ticks} for this process and its descendants."""
        try:
            pids = sorted(int(e.name) for e in os.scandir("/proc") if e.name.isdigit())
        except OSError:
            return None
        out: dict[tuple[int, str], int] = {}
        # Ascending pids visit a parent before its children, except after pid wrap-around; the rare child
        # classified as foreign that way is lost to the meter, a bounded error accepted for the speed.
        for pid in pids:
            if pid in self._foreign:
                continue
            fields = _stat_fields(pid)
            if fields is None:
                continue  # exited meanwhile
            if pid not in self._ours:
                if int(fields[1]) not in self._ours:
                    self._foreign.add(pid)
                    continue
                self._ours.add(pid)
            out[(pid, fields[19])] = int(fields[11]) + int(fields[12])  # start time tells a reused pid apart
        return out


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after "pid (comm) ": state ppid pgrp session tty tpgid flags minflt
    cminflt majflt cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime ...
    (comm may hold spaces and parentheses, hence the split after the last ")")."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


# -------------------------------------------------------------------------------------------------------
# Inputs


def rt_review_pool() -> list[str]:
    """Real Rotten Tomatoes review snippets (both splits of `infra.assets.write_rt_splits`, its defaults,
    in the shared asset cache: the same files `make assets` writes, so this is a no-op once fetched)."""
    import pyarrow.parquet as pq

    from infra.assets import asset_cache, write_rt_splits

    train, test = write_rt_splits(asset_cache() / "rt")
    return [
        t for path in (test, train) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()
    ]


def build_texts(
    pool: Sequence[str], n: int, *, seed: int, min_words: int = 5, max_words: int = 200
) -> list[str]:
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


def committed_shards(output_uri: str, run_id: str) -> list[dict[str, Any]]:
    """The commit records (as dicts) of the shards that run `run_id` committed in an output."""
    from dataclasses import asdict as _asdict

    from pipeline.commit import OutputDir

    return [_asdict(r) for r in OutputDir(output_uri).committed().values() if r.run_id == run_id]


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


def steady_rate(events: Sequence[tuple[float, int]]) -> float | None:
    """Rows per second between the first and the last (time, rows) event, the first event's rows excluded;
    None with fewer than two distinct times."""
    events = sorted(events)
    if len(events) < 2 or events[-1][0] <= events[0][0]:
        return None
    return sum(r for _, r in events[1:]) / (events[-1][0] - events[0][0])


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
            "rows_per_cpu_s": _median_or_none([r.rows_per_cpu_s for r in rs], 2),
            "repeats": [r.figures() for r in rs],
        }
    ref = out.get(reference)
    for fig in out.values():
        for key in ("rows_per_s", "steady_rows_per_s", "rows_per_cpu_s"):
            ratio = fig[key] / ref[key] if ref and ref[key] and fig[key] is not None else None
            fig[f"{key}_vs_{reference}"] = round(ratio, 3) if ratio is not None else None
    return out


def _median_or_none(values: Sequence[float | None], digits: int) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), digits) if present else None


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


def format_table(
    summary: Mapping[str, Mapping[str, Any]], *, reference: str, agreement_vs_reference: Mapping[str, float]
) -> str:
    """A fixed-width table: one line per system, figures as medians over repeats, ratios to `reference`."""
    cols = [
        ("system", 12, "<"),
        ("rows/s", 9, ">"),
        ("steady", 9, ">"),
        ("startup s", 10, ">"),
        ("wall s", 8, ">"),
        ("rows/cpu-s", 11, ">"),
        (f"steady x{reference[:4]}", 14, ">"),
        (f"job x{reference[:4]}", 11, ">"),
        (f"cpu x{reference[:4]}", 11, ">"),
        ("agree", 9, ">"),
    ]
    head = "".join(f"{name:{align}{width}}" for name, width, align in cols)
    lines = [head, "-" * len(head)]
    for name, fig in summary.items():
        agree = agreement_vs_reference.get(name)
        cells = [
            name,
            f"{fig['rows_per_s']:.1f}",
            f"{fig['steady_rows_per_s']:.1f}",
            f"{fig['startup_s']:.2f}",
            f"{fig['wall_s']:.1f}",
            _fmt(fig.get("rows_per_cpu_s"), ""),
            _fmt(fig.get(f"steady_rows_per_s_vs_{reference}"), "x"),
            _fmt(fig.get(f"rows_per_s_vs_{reference}"), "x"),
            _fmt(fig.get(f"rows_per_cpu_s_vs_{reference}"), "x"),
            f"{agree:.2%}" if agree is not None else "-",
        ]
        lines.append("".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, cols, strict=True)))
    return "\n".join(lines)


def _fmt(value: float | None, unit: str) -> str:
    return f"{value:.2f}{unit}" if value is not None else "-"
