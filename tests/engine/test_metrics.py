"""Job metrics (pipeline.metrics) without a job: the worker-side recorder, the figures, and that a broken sink
never fails a block. The end-to-end checks (events add up to the commit records) are in test_dag/test_execute."""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pytest

from pipeline import metrics
from pipeline.batching import run_micro_batches
from pipeline.block import ERR_MSG, ERR_STAGE, ERR_STEP, ERR_TYPE, SHARD, set_errors
from pipeline.metrics import (
    EVENT_SCHEMA,
    MetricsContext,
    Recorder,
    events_table,
    queue_depth,
    rates,
    summarise,
)


def _block(n: int) -> pa.Table:
    return pa.table(
        {
            SHARD: pa.array(["00007"] * n),
            ERR_STAGE: pa.nulls(n, pa.string()),
            ERR_STEP: pa.nulls(n, pa.string()),
            ERR_TYPE: pa.nulls(n, pa.string()),
            ERR_MSG: pa.nulls(n, pa.string()),
        }
    )


class _Remote:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class _ListSink:
    def __init__(self) -> None:
        self.got: list[Any] = []
        self.add = _Remote(lambda events: self.got.extend(events))


def test_recorder_counts_rows_errors_and_types_per_step(monkeypatch):
    monkeypatch.setattr("ray.get", lambda ref, timeout=None: ref)
    monkeypatch.setattr(metrics, "record_ray_metrics", lambda job, events: None)
    sink = _ListSink()
    rec = Recorder(MetricsContext(sink, "run1", "job"))
    read = set_errors(_block(10), None, "read", [("ParseError", "x") if i == 0 else None for i in range(10)])
    rec.step(None, "read", 100.0, None, read)
    pre = set_errors(
        read, "s", "preprocess", [("InputTooLong", "x") if i in (0, 1, 2) else None for i in range(10)]
    )
    rec.step("s", "preprocess", 101.0, read, pre)
    rec.forward(
        "s",
        shard="00007",
        t_start=102.0,
        seconds=0.5,
        lengths=[5, 3, 2],
        errors=[None, ("Boom", "m"), None],
        unit="tokens",
        pads=True,
    )
    rec.forward(
        "p",
        shard="00007",
        t_start=102.0,
        seconds=0.5,
        lengths=[5, 3],
        errors=[None, None],
        unit="pixels",
        pads=False,
    )
    rec.step(None, "commit", 103.0, None, pre)
    assert sink.got == []  # nothing leaves the worker before the block is done
    rec.send()
    ev = events_table(sink.got).to_pylist()
    assert [(e["stage"], e["step"], e["rows"], e["rows_error"]) for e in ev] == [
        (None, "read", 10, 1),
        ("s", "preprocess", 9, 2),  # the read error was not its to count
        ("s", "forward", 3, 1),
        ("p", "forward", 2, 0),
        (None, "commit", 10, 3),
    ]
    assert json.loads(ev[1]["error_types"]) == {"InputTooLong": 2}
    assert (ev[2]["real_units"], ev[2]["padded_units"]) == (10, 15)  # 3 rows × longest 5
    assert (ev[3]["real_units"], ev[3]["padded_units"]) == (8, 8)  # shape-grouped: no padding
    assert {e["shard"] for e in ev} == {"00007"} and {e["run_id"] for e in ev} == {"run1"}


def test_a_failing_sink_or_ray_metrics_never_fails_the_block(monkeypatch):
    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("the sink actor died")

    monkeypatch.setattr(metrics, "record_ray_metrics", broken)
    sink = _ListSink()
    sink.add = _Remote(broken)
    rec = Recorder(MetricsContext(sink, "run1", "job"))
    rec.step(None, "read", 1.0, None, _block(3))
    rec.send()  # no exception
    off = Recorder(None)  # metrics off: nothing is recorded or sent
    off.step(None, "read", 1.0, None, _block(3))
    off.send()
    assert off.events == []


def test_micro_batches_report_their_rows_time_and_errors():
    seen: list[tuple[list[int], list[Any]]] = []

    def forward(batch: list[Any]) -> list[Any]:
        if any(r["x"] == 3 for r in batch):
            raise ValueError("bad row")
        return [{"y": r["x"]} for r in batch]

    rows = [{"x": i} for i in range(5)]
    result = run_micro_batches(
        forward,
        rows,
        [1, 5, 2, 4, 3],
        batch_size=2,
        on_batch=lambda idx, t, s, errs: seen.append((idx, errs)),
    )
    assert [idx for idx, _ in seen] == [[1, 3], [4, 2], [0]]  # longest first
    assert seen[0][1] == [None, ("ValueError", "bad row")]  # the row retried alone still failed
    assert result.errors[3] is not None and result.outputs[1] == {"y": 1}


def _ev(
    stage: Any, step: str, t: float, s: float, rows: int, err: int = 0, worker: str = "w", **kw: Any
) -> tuple:
    d = {
        "run_id": "r",
        "stage": stage,
        "step": step,
        "shard": "0",
        "worker": worker,
        "t_start": t,
        "seconds": s,
        "rows": rows,
        "rows_error": err,
        "real_units": None,
        "padded_units": None,
        "unit": None,
        "error_types": None,
    }
    d.update(kw)
    return tuple(d[f.name] for f in EVENT_SCHEMA)


def test_summary_figures_from_known_events():
    fwd = {"unit": "tokens"}
    events = events_table(
        [
            _ev(None, "read", 0.0, 1.0, 10),
            _ev("s", "preprocess", 1.0, 1.0, 10, 2, error_types=json.dumps({"InputTooLong": 2})),
            _ev("s", "forward", 2.0, 1.0, 4, 0, "a", real_units=30, padded_units=40, **fwd),
            _ev(
                "s",
                "forward",
                3.0,
                3.0,
                4,
                1,
                "b",
                real_units=10,
                padded_units=40,
                error_types='{"Boom": 1}',
                **fwd,
            ),
            _ev("s", "postprocess", 6.0, 1.0, 7),
            _ev(None, "commit", 7.0, 1.0, 10, 3),
        ]
    )
    out = summarise(
        events, run={"started_at": -2.0, "stages": [{"name": "s", "task": "text-classification"}]}
    )
    st = out["stages"]["s"]
    assert out["first_commit_s"] == 10.0 and out["active_s"] == 8.0
    assert (st["rows_in"], st["rows_ok"], st["rows_error"]) == (10, 7, 3)
    assert st["forward"]["padding_efficiency"] == 0.5 and st["forward"]["micro_batches"] == 2
    assert st["forward"]["latency_s"]["max"] == 3.0 and st["forward"]["latency_s"]["p50"] == 2.0
    assert st["replicas"] == 2 and st["busy_share"] == pytest.approx(4.0 / (2 * 8.0))
    assert st["replica_busy"] == {"a": 1 / 8, "b": 3 / 8}
    assert st["waiting_max"] == {"forward": 8, "postprocess": 7}
    assert out["errors"] == [
        {"stage": "s", "step": "preprocess", "error_type": "InputTooLong", "rows": 2},
        {"stage": "s", "step": "forward", "error_type": "Boom", "rows": 1},
    ]
    assert [(s["stage"], s["step"]) for s in out["steps"]] == [
        (None, "read"),
        ("s", "preprocess"),
        ("s", "forward"),
        ("s", "postprocess"),
        (None, "commit"),
    ]
    depth = [
        (d["t"], d["between"], d["rows"])
        for d in queue_depth(events).to_pylist()
        if d["between"] == "forward"
    ]
    assert depth == [(2.0, "forward", 8), (2.0, "forward", 4), (3.0, "forward", 0)]
    per_bin = {(r["stage"], r["step"], r["t"]): r["rows_per_s"] for r in rates(events, bin_s=4.0).to_pylist()}
    assert per_bin[("s", "forward", 0.0)] == 1.0 and per_bin[("s", "forward", 4.0)] == 1.0
    assert summarise(events_table([]))["stages"] == {}


def test_ray_metrics_are_recorded_per_step_outcome_and_micro_batch(monkeypatch):
    calls: list[tuple[str, Any, dict[str, str]]] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def inc(self, value: float, tags: dict[str, str]) -> None:
            calls.append((self.name, value, tags))

        def observe(self, value: float, tags: dict[str, str]) -> None:
            calls.append((self.name, value, tags))

    monkeypatch.setattr(metrics, "_RAY_METRICS", {k: Fake(k) for k in ("rows", "forward", "units")})
    metrics.record_ray_metrics(
        "job",
        [
            _ev("s", "preprocess", 0.0, 1.0, 10, 2),
            _ev("s", "forward", 1.0, 0.25, 8, 0, real_units=30, padded_units=40, unit="tokens"),
        ],
    )
    assert ("rows", 8, {"job": "job", "stage": "s", "step": "preprocess", "outcome": "ok"}) in calls
    assert ("rows", 2, {"job": "job", "stage": "s", "step": "preprocess", "outcome": "error"}) in calls
    assert ("forward", 0.25, {"job": "job", "stage": "s"}) in calls
    assert ("units", 40, {"job": "job", "stage": "s", "unit": "tokens", "kind": "padded"}) in calls


def _prometheus_lines(prefix: str, job: str, timeout_s: float = 60.0) -> list[str]:
    """The node metrics agent's Prometheus lines of `prefix` for `job` (workers export every few seconds)."""
    import urllib.request

    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.time() + timeout_s
    lines: list[str] = []
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        lines = [ln for ln in text.splitlines() if ln.startswith(prefix) and f'job="{job}"' in ln]
        if lines:
            return lines
        time.sleep(1.0)
    return lines


def _value(lines: list[str], *labels: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if all(label in ln for label in labels))


@pytest.mark.timeout(180)
def test_a_workers_events_reach_the_sink_and_rays_prometheus_endpoint(ray_session):
    """A replica-like actor records a micro-batch through a real sink actor: the driver drains the event, and
    the counters appear on the node's Prometheus endpoint (what a cluster's Prometheus scrapes)."""
    import ray

    sink = ray.remote(num_cpus=0)(metrics.Sink).remote()

    @ray.remote(num_cpus=0)
    class Worker:
        def go(self) -> None:
            rec = Recorder(MetricsContext(sink, "run1", "metrics-test"))
            rec.forward(
                "s",
                shard="0",
                t_start=time.time(),
                seconds=0.2,
                lengths=[3, 5],
                errors=[None, ("Boom", "x")],
                unit="tokens",
                pads=True,
            )
            rec.send()

    worker = Worker.remote()
    try:
        ray.get(worker.go.remote())
        events = ray.get(sink.drain.remote())
        assert [(e[2], e[7], e[8], e[9], e[10]) for e in events] == [("forward", 2, 1, 8, 10)]
        assert events[0][4] == worker._actor_id.hex()  # the replica is named by its actor id
        rows = _prometheus_lines("ray_shardwise_rows", "metrics-test")
        assert _value(rows, 'step="forward"', 'outcome="error"') == 1.0, rows
        assert _value(rows, 'step="forward"', 'outcome="ok"') == 1.0, rows
        units = _prometheus_lines("ray_shardwise_units", "metrics-test")
        assert _value(units, 'kind="padded"', 'unit="tokens"') == 10.0, units
        assert _value(units, 'kind="real"') == 8.0, units
        assert _prometheus_lines("ray_shardwise_forward_seconds_count", "metrics-test")
    finally:
        ray.kill(worker)
        ray.kill(sink)
