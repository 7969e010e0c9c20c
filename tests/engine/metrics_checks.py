"""Checks of a run's job metrics (`_metrics/runtime/<run_id>/`, pipeline.metrics) against what the output says
(commit records, error records, the manifest): the events count the same rows the commit records do."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from pipeline.commit import OutputDir, read_errors
from pipeline.metrics import list_runs, queue_depth, read_events, read_live, read_progress, read_summary


def _sums(events: Any) -> dict[tuple[str | None, str], tuple[int, int]]:
    out: dict[tuple[str | None, str], list[int]] = {}
    for ev in events.to_pylist():
        acc = out.setdefault((ev["stage"], ev["step"]), [0, 0])
        acc[0] += ev["rows"]
        acc[1] += ev["rows_error"]
    return {k: (v[0], v[1]) for k, v in out.items()}


def assert_run_metrics(uri: str, run_id: str, stages: list[str], *, unit: dict[str, str]) -> dict[str, Any]:
    """A finished run that computed every shard of a job, in one attempt each (no retried tasks): its events
    hold every (stage, step), their rows add up to the commit and error records, padding is real <= padded,
    and summary.json's figures are there and sane. Returns the summary."""
    assert run_id in list_runs(uri)
    events = read_events(uri, run_id)
    assert set(events.column("run_id").to_pylist()) == {run_id}
    records = [r for r in OutputDir(uri).committed().values() if r.run_id == run_id]
    sums = _sums(events)
    want_keys = {(None, "read"), (None, "commit")} | {
        (s, step) for s in stages for step in ("preprocess", "forward", "postprocess")
    }
    assert set(sums) == want_keys, sorted(sums, key=str)
    rows_in = sum(r.rows_in for r in records)
    assert sums[(None, "commit")] == (rows_in, sum(r.rows_error for r in records))
    assert len(records) == len(OutputDir(uri).committed()), "this check needs a run that computed every shard"
    errors = read_errors(uri).to_pylist()
    by_step = Counter((e["stage"], e["step"]) for e in errors)
    assert sums[(None, "read")] == (rows_in, by_step.get((None, "read"), 0))
    reached = rows_in - by_step.get((None, "read"), 0)
    for s in stages:
        pre, fwd, post = (sums[(s, step)] for step in ("preprocess", "forward", "postprocess"))
        assert pre == (reached, by_step.get((s, "preprocess"), 0)), (s, pre)
        assert fwd == (pre[0] - pre[1], by_step.get((s, "forward"), 0)), (s, fwd)
        assert post == (fwd[0] - fwd[1], by_step.get((s, "postprocess"), 0)), (s, post)
        reached = post[0] - post[1]
    commits = [e for e in events.to_pylist() if e["step"] == "commit"]
    assert sorted(e["shard"] for e in commits) == sorted(r.shard_id for r in records)
    fwd_events = [e for e in events.to_pylist() if e["step"] == "forward"]
    assert fwd_events and all(0 < e["real_units"] <= e["padded_units"] for e in fwd_events)
    assert {(e["stage"], e["unit"]) for e in fwd_events} == {(s, unit[s]) for s in stages}
    depth = queue_depth(events).to_pylist()
    assert depth and min(d["rows"] for d in depth) >= 0
    progress = read_progress(uri, run_id)
    assert progress.num_rows >= 1 and progress.column("rows_run").to_pylist()[-1] == rows_in

    summary = read_summary(uri, run_id)
    assert summary is not None and summary["run_id"] == run_id and summary["rows_run"] == rows_in
    assert summary["events"] == events.num_rows
    assert 0 < summary["first_commit_s"] <= summary["wall_s"]
    for s in stages:
        st = summary["stages"][s]
        assert st["unit"] == unit[s] and st["replicas"] >= 1
        assert 0 < st["busy_share"] <= 1.0 + 1e-6, st
        assert 0 < st["forward"]["padding_efficiency"] <= 1.0
        lat = st["forward"]["latency_s"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["max"]
        assert st["rows_per_s"] > 0
    errors_by_type = Counter((e["stage"], e["step"], e["error_type"]) for e in errors)
    assert {(e["stage"], e["step"], e["error_type"]): e["rows"] for e in summary["errors"]} == dict(
        errors_by_type
    )
    json.dumps(summary)  # plain JSON
    live = read_live(uri, run_id)  # the last drain's, at the end of the run
    assert live is not None and set(live["stages"]) == set(stages)
    return summary
