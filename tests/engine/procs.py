"""Process helpers for the fault tests: find Ray workers by their title, wait for commits, run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pids_matching(text: str) -> list[int]:
    """PIDs whose command line (Ray sets it to the actor's name) contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            pids.append(int(entry.name))
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
