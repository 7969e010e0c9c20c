"""`shardwise schedule JOB.yaml --cron "0 2 * * *"`: run (or submit) a job at every cron tick.

Rules (what a user can rely on):
- Ticks come from `croniter` in the machine's local time zone (set `TZ` to change it), like cron.
- Never overlapping: a tick that comes while a run is going starts no second run; it is logged as skipped.
- Coalescing: ticks that passed while a run was going, or while the process could not look (a suspended
  machine, a clock jump), become ONE run started as soon as possible, logged with the count. So a run that
  outlasts its period is followed at once by one catch-up run, never by a pile of them.
- Each run ends with one summary line (state, rows ok/error, wall, exit code) on stdout and in the log file.
- A failed run (non-zero exit, an exception, a refused spec) is logged with its reason; the schedule goes on.
  The spec file is read again at every run, so an edit takes effect at the next tick (and a broken edit
  fails that run only).
- SIGTERM / SIGINT stop the schedule and the process exits 0. The current run is interrupted: a local run
  (`shardwise run` in a child process) gets SIGINT and stops, keeping its committed shards for the next run
  to resume (SIGKILL if it is still there after `INTERRUPT_GRACE_S`); a submitted cluster job is left
  running (the scheduler stops waiting and logs its id: `shardwise jobs stop ID` stops it).

`Scheduler(cron, run_once, clock=..., sleep=...)` holds only the timing rules; the clock and sleep are
injected so tests move time by hand.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from croniter import croniter

from jobs.submit import connect, job_info, submit
from pipeline.bind import load_job as load_spec
from pipeline.commit import OutputDir
from pipeline.errors import ShardwiseError, SpecError

__all__ = [
    "RunSummary",
    "Scheduler",
    "SubmitRun",
    "SubprocessRun",
    "check_cron",
    "default_log_file",
    "install_signal_handlers",
    "log_to",
]

# A local run that ignores SIGINT this long is killed (its committed shards survive either way).
INTERRUPT_GRACE_S = 30.0
# Sleep in slices of at most this, so a clock jump or a resumed machine is noticed within a minute.
MAX_SLEEP_S = 60.0
# Counting missed ticks stops here (a minutely cron after a year asleep is "many", not 525,600 steps).
_MAX_COUNTED_TICKS = 100_000


def check_cron(cron: str) -> str:
    if not croniter.is_valid(cron):
        raise SpecError(
            "--cron",
            f"{cron!r} is not a cron expression; expected 5 fields 'minute hour day-of-month month "
            "day-of-week', e.g. '0 2 * * *' for 02:00 every day",
        )
    return cron


@dataclass(frozen=True)
class RunSummary:
    """What one run did, as the log line shows it."""

    state: str  # succeeded | failed | refused | interrupted | stopped | ... (a Ray job status, lowered)
    exit_code: int
    rows_ok: int | None = None
    rows_error: int | None = None
    wall_s: float = 0.0
    reason: str | None = None
    job_id: str | None = None

    def line(self) -> str:
        rows = (
            f"rows ok {self.rows_ok}, errors {self.rows_error}"
            if self.rows_ok is not None
            else "rows ok -, errors -"
        )
        text = f"{self.state}; {rows}; wall {self.wall_s:.1f} s; exit {self.exit_code}"
        if self.job_id:
            text += f"; job {self.job_id}"
        if self.reason:
            text += f"; reason: {self.reason}"
        return text


def _local_now() -> dt.datetime:
    return dt.datetime.now().astimezone()


def _fmt(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


class Scheduler:
    """Calls `run_once` at each tick of `cron`, by the rules in the module docstring.

    clock: the current time, timezone-aware. sleep(seconds): waits (the default wakes early on `stop()`).
    interrupt: called by `stop()` while a run is going (e.g. SIGINT to the child process).
    """

    def __init__(
        self,
        cron: str,
        run_once: Callable[[], RunSummary],
        *,
        clock: Callable[[], dt.datetime] = _local_now,
        sleep: Callable[[float], Any] | None = None,
        interrupt: Callable[[], None] | None = None,
        log: Callable[[str], None] = print,
        run_at_start: bool = False,
    ) -> None:
        self.cron = check_cron(cron)
        self._run_once = run_once
        self._clock = clock
        self._stopped = threading.Event()
        self._sleep = sleep if sleep is not None else self._stopped.wait
        self._interrupt = interrupt
        self._log = log
        self._run_at_start = run_at_start
        self._running = threading.Lock()
        self.summaries: list[RunSummary] = []

    def stop(self, reason: str = "stop requested") -> None:
        """Stop taking ticks; interrupt the current run if there is one. Safe from a signal handler."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._running.locked():
            self._log(f"{reason}: interrupting the current run")
            if self._interrupt is not None:
                self._interrupt()
        else:
            self._log(f"{reason}: no run is going")

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _next(self, after: dt.datetime) -> dt.datetime:
        return croniter(self.cron, after).get_next(dt.datetime)

    def _due(self, first: dt.datetime, now: dt.datetime) -> tuple[int, dt.datetime, dt.datetime, dt.datetime]:
        """(count, first, last) of the ticks in [first, now] and the next tick after now."""
        count, last, tick = 0, first, first
        while tick <= now and count < _MAX_COUNTED_TICKS:
            count, last = count + 1, tick
            tick = self._next(tick)
        if tick <= now:  # too many to count one by one
            tick = self._next(now)
        return count, first, last, tick

    def run(self, *, max_runs: int | None = None) -> list[RunSummary]:
        """Run until `stop()` (or `max_runs` runs). Returns the summaries of the runs it made."""
        now = self._clock()
        next_tick = self._next(now)
        self._log(f"schedule {self.cron!r}: next tick {_fmt(next_tick)}")
        start_pending = self._run_at_start
        while not self._stopped.is_set():
            if max_runs is not None and len(self.summaries) >= max_runs:
                break
            now = self._clock()
            if start_pending:
                start_pending = False
                why = "run at start"
            elif now < next_tick:
                self._sleep(min((next_tick - now).total_seconds(), MAX_SLEEP_S))
                continue
            else:
                count, first, last, next_tick = self._due(next_tick, now)
                if count == 1:
                    why = f"tick {_fmt(first)}"
                else:
                    why = f"{count} ticks missed ({_fmt(first)} … {_fmt(last)}); one run for all of them"
            self._one_run(why)
            if self._stopped.is_set():
                break
            ended = self._clock()
            if next_tick <= ended:
                count, first, last, _ = self._due(next_tick, ended)
                self._log(
                    f"{count} tick(s) came while the run was going ({_fmt(first)} … {_fmt(last)}): "
                    "skipped, no second run started; one catch-up run follows"
                )
        ok = sum(s.state == "succeeded" for s in self.summaries)
        self._log(
            f"schedule stopped: {len(self.summaries)} run(s), {ok} succeeded, "
            f"{len(self.summaries) - ok} not; exit codes {[s.exit_code for s in self.summaries]}"
        )
        return self.summaries

    def _one_run(self, why: str) -> RunSummary | None:
        number = len(self.summaries) + 1
        with self._running:
            if self._stopped.is_set():  # stop() came just before the run: do not start it
                return None
            self._log(f"run {number} ({why}): started")
            try:
                summary = self._run_once()
            except Exception as e:  # noqa: BLE001 - a failed run is logged; the schedule goes on
                summary = RunSummary(state="failed", exit_code=1, reason=f"{type(e).__name__}: {e}")
        self.summaries.append(summary)
        self._log(f"run {number}: {summary.line()}")
        return summary


# -------------------------------------------------------------------------------------------------------
# What one run is: `shardwise run` in a child process, or a job submitted to a cluster.


def _output_counts(spec_path: str, overrides: Sequence[str], since: float) -> tuple[int | None, int | None]:
    """rows ok/error from the output's manifest, if this run wrote it (a refused run writes none)."""
    try:
        spec = load_spec(spec_path, overrides)
        manifest = OutputDir(spec.output.uri, storage_options=spec.output.storage_options).read_manifest()
    except Exception:  # noqa: BLE001 - counts are informative; the exit code is the verdict
        return None, None
    if not manifest or not manifest.get("runs") or manifest["runs"][-1].get("started_at", 0) < since - 1:
        return None, None
    return manifest.get("rows_ok"), manifest.get("rows_error")


def _last_error(log_file: Path | None, offset: int) -> str | None:
    if log_file is None or not log_file.exists():
        return None
    with log_file.open("rb") as f:
        f.seek(max(offset, log_file.stat().st_size - 64 * 1024))
        tail = f.read().decode(errors="replace").splitlines()
    for line in reversed(tail):
        if line.startswith("shardwise: error: "):
            return line[len("shardwise: error: ") :]
    return None


class SubprocessRun:
    """One run = `python -m jobs run SPEC [--set ...] [--address A] --no-progress` in a child process,
    its output appended to the log file. `interrupt()` sends the child SIGINT (SIGKILL after the grace)."""

    def __init__(
        self,
        spec_path: str,
        *,
        overrides: Sequence[str] = (),
        address: str | None = None,
        log_file: Path | None = None,
        grace_s: float = INTERRUPT_GRACE_S,
    ) -> None:
        self.spec_path = spec_path
        self.overrides = list(overrides)
        self.address = address
        self.log_file = log_file
        self.grace_s = grace_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._interrupted = False

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "jobs", "run", self.spec_path, "--no-progress"]
        for item in self.overrides:
            cmd += ["--set", item]
        if self.address:
            cmd += ["--address", self.address]
        return cmd

    def __call__(self) -> RunSummary:
        started = time.time()
        try:
            load_spec(self.spec_path, self.overrides)  # a broken edit fails this run, not the schedule
        except ShardwiseError as e:
            return RunSummary(state="refused", exit_code=2, reason=str(e))
        offset = self.log_file.stat().st_size if self.log_file and self.log_file.exists() else 0
        sink = self.log_file.open("ab") if self.log_file else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(self.command(), stdout=sink, stderr=subprocess.STDOUT)
            if self._interrupted:  # interrupt() came while the child was being started
                self._proc.send_signal(signal.SIGINT)
            code = self._proc.wait()
        finally:
            if self.log_file:
                sink.close()  # type: ignore[union-attr]
        wall = time.time() - started
        rows_ok, rows_error = _output_counts(self.spec_path, self.overrides, started)
        if self._interrupted:
            state = "interrupted"
        else:
            state = {0: "succeeded", 2: "refused"}.get(code, "failed")
        reason = None if code == 0 else _last_error(self.log_file, offset) or f"exit code {code}"
        return RunSummary(state, code, rows_ok, rows_error, wall, reason)

    def interrupt(self) -> None:
        self._interrupted = True  # one instance serves one schedule: after an interrupt it stops
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)

        def kill_later() -> None:
            try:
                proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()

        threading.Thread(target=kill_later, daemon=True).start()


class SubmitRun:
    """One run = `submit` to a cluster, then wait for the job to end. `interrupt()` stops waiting and leaves
    the cluster job running (its id is in the log)."""

    def __init__(
        self,
        spec_path: str,
        *,
        overrides: Sequence[str] = (),
        address: str | None = None,
        local_paths_ok: bool = False,
        token_file: str | None = None,
        log_file: Path | None = None,
        poll_s: float = 2.0,
    ) -> None:
        self.spec_path = spec_path
        self.overrides = list(overrides)
        self.address = address
        self.local_paths_ok = local_paths_ok
        self.token_file = token_file
        self.log_file = log_file
        self.poll_s = poll_s
        self._stop = threading.Event()

    def __call__(self) -> RunSummary:
        started = time.time()
        try:
            job_id = submit(
                self.spec_path,
                overrides=self.overrides,
                address=self.address,
                local_paths_ok=self.local_paths_ok,
                token_file=self.token_file,
            )
            client = connect(self.address, token_file=self.token_file)
            info = job_info(client, job_id)
            while not info.terminal and not self._stop.wait(self.poll_s):
                info = job_info(client, job_id)
        except ShardwiseError as e:
            return RunSummary(state="refused", exit_code=2, reason=str(e), wall_s=time.time() - started)
        wall = time.time() - started
        if not info.terminal:
            return RunSummary("left running", 0, wall_s=wall, job_id=job_id, reason="scheduler stopped")
        if self.log_file:
            # The driver log is a courtesy copy; failing to fetch it must not fail the run.
            with self.log_file.open("a") as f, contextlib.suppress(Exception):
                f.write(client.ray.get_job_logs(job_id))
        rows_ok, rows_error = _output_counts(self.spec_path, self.overrides, started)
        code = 0 if info.status == "SUCCEEDED" else 1
        return RunSummary(
            info.status.lower(), code, rows_ok, rows_error, wall, None if code == 0 else info.message, job_id
        )

    def interrupt(self) -> None:
        self._stop.set()


def log_to(log_file: Path | None) -> Callable[[str], None]:
    """A log function: a timestamped line on stdout and appended to `log_file`."""
    lock = threading.RLock()  # re-entered when a signal handler logs in the middle of a line

    def log(message: str) -> None:
        line = f"{_fmt(_local_now())} {message}"
        with lock:
            print(line, flush=True)
            if log_file is not None:
                with log_file.open("a") as f:
                    f.write(line + "\n")

    return log


def install_signal_handlers(scheduler: Scheduler) -> None:
    """SIGTERM and SIGINT stop the schedule (the process then exits 0)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: scheduler.stop(f"{signal.Signals(signum).name} received"))


def default_log_file(name: str) -> Path:
    return Path(os.getcwd()) / f"{name}.schedule.log"
