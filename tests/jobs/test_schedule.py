"""`shardwise schedule`: the timing rules with an injected clock (no real minutes), stopping from another
thread, and the real CLI in a child process (one run, then SIGTERM)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.schedule import RunSummary, Scheduler
from pipeline.errors import SpecError
from tests.helpers import job_dict, make_text_classifier, make_texts, write_texts_parquet

ROOT = Path(__file__).resolve().parents[2]
UTC = dt.UTC


def at(hhmmss: str, day: int = 1) -> dt.datetime:
    h, m, s = (int(x) for x in hhmmss.split(":"))
    return dt.datetime(2026, 12, day, h, m, s, tzinfo=UTC)


class FakeTime:
    """A clock that moves only when the scheduler sleeps or a run takes time."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start
        self.jumps: list[float] = []  # extra seconds the next sleeps lose (a suspended machine)

    def clock(self) -> dt.datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += dt.timedelta(seconds=seconds + (self.jumps.pop(0) if self.jumps else 0))


class Job:
    """run_once: records when each run started/ended; run i takes durations[i] seconds and returns or
    raises outcomes[i]."""

    def __init__(self, t: FakeTime, durations: list[float], outcomes: list[object] | None = None) -> None:
        self.t, self.durations, self.outcomes = t, durations, outcomes or []
        self.runs: list[tuple[dt.datetime, dt.datetime]] = []

    def __call__(self) -> RunSummary:
        i = len(self.runs)
        start = self.t.now
        self.t.now += dt.timedelta(seconds=self.durations[i])
        self.runs.append((start, self.t.now))
        outcome = self.outcomes[i] if i < len(self.outcomes) else None
        if isinstance(outcome, Exception):
            raise outcome
        return outcome or RunSummary("succeeded", 0, rows_ok=10, rows_error=0, wall_s=self.durations[i])


def schedule(cron: str, t: FakeTime, job: Job, **kwargs) -> tuple[Scheduler, list[str]]:
    lines: list[str] = []
    return Scheduler(cron, job, clock=t.clock, sleep=t.sleep, log=lines.append, **kwargs), lines


def test_ticks_fire_runs_at_the_tick_times():
    t = FakeTime(at("01:03:00"))
    job = Job(t, [30, 30, 30])
    s, lines = schedule("*/10 * * * *", t, job)
    s.run(max_runs=3)
    assert [start for start, _ in job.runs] == [at("01:10:00"), at("01:20:00"), at("01:30:00")]
    assert lines[0] == "schedule '*/10 * * * *': next tick 2026-12-01T01:10:00+00:00"
    assert "run 2 (tick 2026-12-01T01:20:00+00:00): started" in lines
    assert "run 1: succeeded; rows ok 10, errors 0; wall 30.0 s; exit 0" in lines


def test_a_tick_during_a_run_is_skipped_and_one_catch_up_run_follows():
    t = FakeTime(at("00:00:30"))
    job = Job(t, [150, 10, 10])  # run 1: 00:01:00 → 00:03:30, over the ticks of 00:02 and 00:03
    s, lines = schedule("* * * * *", t, job)
    s.run(max_runs=3)
    starts = [start for start, _ in job.runs]
    assert starts == [at("00:01:00"), at("00:03:30"), at("00:04:00")]
    assert all(end <= nxt for (_, end), nxt in zip(job.runs, starts[1:], strict=False))  # never overlapping
    assert any(
        "2 tick(s) came while the run was going (2026-12-01T00:02:00+00:00 … 2026-12-01T00:03:00+00:00): "
        "skipped" in line
        for line in lines
    )
    assert any(line.startswith("run 2 (2 ticks missed") and "one run for all" in line for line in lines)


def test_missed_ticks_coalesce_into_one_run():
    t = FakeTime(at("00:30:00"))
    t.jumps = [5 * 3600]  # the first sleep (a 60 s slice) lasts 5 h more: 01:00 … 05:00 pass unseen
    job = Job(t, [60, 60])
    s, lines = schedule("0 * * * *", t, job)
    s.run(max_runs=2)
    assert [start for start, _ in job.runs] == [at("05:31:00"), at("06:00:00")]
    assert (
        "run 1 (5 ticks missed (2026-12-01T01:00:00+00:00 … 2026-12-01T05:00:00+00:00); "
        "one run for all of them): started"
    ) in lines


def test_a_failing_run_does_not_stop_the_schedule():
    t = FakeTime(at("01:59:00"))
    outcomes = [RuntimeError("cluster unreachable"), RunSummary("failed", 1, reason="max_error_rate"), None]
    job = Job(t, [5, 5, 5], outcomes)
    s, lines = schedule("0 */1 * * *", t, job)
    summaries = s.run(max_runs=3)
    assert [x.state for x in summaries] == ["failed", "failed", "succeeded"]
    assert [x.exit_code for x in summaries] == [1, 1, 0]
    assert [start for start, _ in job.runs] == [at("02:00:00"), at("03:00:00"), at("04:00:00")]
    assert any("reason: RuntimeError: cluster unreachable" in line for line in lines)
    assert "exit codes [1, 1, 0]" in lines[-1]


def test_bad_cron_is_refused_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SpecError) as e:
        Scheduler("61 * * * *", lambda: RunSummary("succeeded", 0))
    assert e.value.key == "--cron"
    assert main(["schedule", str(tmp_path / "no.yaml"), "--cron", "every day"]) == 2
    assert "--cron" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_stop_interrupts_the_current_run_and_returns():
    started, interrupted = threading.Event(), threading.Event()

    def run_once() -> RunSummary:
        started.set()
        assert interrupted.wait(20), "never interrupted"
        return RunSummary("interrupted", 130)

    lines: list[str] = []
    s = Scheduler(
        "0 0 1 1 *", run_once, interrupt=interrupted.set, log=lines.append, run_at_start=True
    )  # real clock and sleep
    result: list[list[RunSummary]] = []
    thread = threading.Thread(target=lambda: result.append(s.run()))
    thread.start()
    assert started.wait(10)
    s.stop("SIGTERM received")
    thread.join(10)
    assert not thread.is_alive()
    assert [x.state for x in result[0]] == ["interrupted"]
    assert "SIGTERM received: interrupting the current run" in lines


@pytest.mark.timeout(30)
def test_stop_wakes_a_sleeping_scheduler_at_once():
    lines: list[str] = []
    s = Scheduler("0 0 1 1 *", lambda: RunSummary("succeeded", 0), log=lines.append)  # next tick: Jan 1
    thread = threading.Thread(target=s.run)
    thread.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    s.stop("SIGTERM received")
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - t0 < 2
    assert "SIGTERM received: no run is going" in lines and s.summaries == []


@pytest.mark.timeout(60)
def test_cli_sigterm_while_waiting_for_a_tick_exits_0(tmp_path):
    spec = job_dict(input_uri="s3://b/in.parquet", output_uri="s3://b/out", model="org/model")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    log = tmp_path / "s.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs", "schedule", "job.yaml", "--cron", "0 0 1 1 *", "--log-file", str(log)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 40
        while "next tick" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    text = log.read_text()
    assert "schedule '0 0 1 1 *': next tick " in text and "-01-01T00:00:00" in text
    assert "SIGTERM received: no run is going" in text and "schedule stopped: 0 run(s)" in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_runs_at_start_logs_the_summary_and_exits_0_on_sigterm(tmp_path):
    model = make_text_classifier(tmp_path / "model", num_labels=2)
    write_texts_parquet(tmp_path / "in.parquet", make_texts(40, seed=3))
    spec = job_dict(
        input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "out"), model=str(model)
    )
    spec["name"] = "nightly"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    log = tmp_path / "schedule.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs", "schedule", "job.yaml", "--cron", "0 0 1 1 *", "--run-at-start"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log = tmp_path / "nightly.schedule.log"  # the default: <job name>.schedule.log in the cwd
        deadline = time.monotonic() + 240
        while "run 1: " not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    text = log.read_text()
    assert "run 1 (run at start): started" in text
    assert "run 1: succeeded; rows ok 40, errors 0; wall " in text and "exit 0" in text
    assert "SIGTERM received: no run is going" in text
    assert "schedule stopped: 1 run(s), 1 succeeded" in text
    assert "run 1: succeeded" in out  # stdout carries the same lines
    assert "succeeded: 40 rows ok" in text  # the run's own output went to the log file
