"""Process helpers for the fault tests: find Ray workers by their title, wait for commits, run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _parents() -> dict[int, int]:
    """pid → parent pid, for every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the fields after the command's closing parenthesis: state, ppid, ...
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(entry.name)] = int(fields[1])
    return parents


def pids_matching(text: str) -> list[int]:
    """PIDs of this test's own processes (descendants of this process: the Ray it started, a CLI it ran and
    that CLI's Ray) whose command line (Ray sets it to the actor's name) contains `text`. Never another
    user's or another test run's processes on the same machine."""
    parents = _parents()
    me = os.getpid()

    def mine(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            seen.add(pid)
            pid = parents.get(pid, 0)
            if pid == me:
                return True
        return False

    pids = []
    for pid in parents:
        if not mine(pid):
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            pids.append(pid)
    return pids


def committed(out: Path) -> int:
    """Single commit records in an output (the driver compacts them only at the end or every 10,000)."""
    return len(list((out / "_shards").glob("*.json"))) if (out / "_shards").exists() else 0


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cli(*args: str) -> subprocess.Popen:
    """`python -m jobs ARGS` in its own session (so killpg takes the driver and the cluster it started)."""
    return subprocess.Popen(
        [sys.executable, "-m", "jobs", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
