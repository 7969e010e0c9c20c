"""The embedded Ray cluster of a CLI run: loopback listeners only, nothing left after SIGTERM, a console
without Ray's own lines. Each test runs `python -m jobs run` as a user would, in its own process tree."""

from __future__ import annotations

import importlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import job_dict, make_texts, write_texts_parquet

ROOT = Path(__file__).resolve().parents[2]


def _psutil() -> Any:
    """psutil as Ray ships it: ray/thirdparty_files joins sys.path when ray is imported."""
    importlib.import_module("ray")
    return importlib.import_module("psutil")


def _cli(spec: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs", "run", str(spec), *extra]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SHARDWISE_CACHE": str(cache)}


def _tree(root: Any) -> list[Any]:
    psutil = _psutil()
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _listening(procs: list[Any]) -> list[tuple[str, str, int]]:
    psutil = _psutil()
    found = []
    for p in procs:
        try:
            name = p.name()
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        found += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return addr.is_loopback


def _start_job(tiny_model: Path, tmp: Path) -> tuple[subprocess.Popen, Any]:
    """A CLI job on the embedded cluster, caught mid-run (a replica actor is up, most rows still to do)."""
    psutil = _psutil()
    write_texts_parquet(tmp / "in.parquet", make_texts(20_000, seed=7))
    spec = tmp / "job.yaml"
    spec.write_text(
        yaml.safe_dump(
            job_dict(input_uri=str(tmp / "in.parquet"), output_uri=str(tmp / "out"), model=str(tiny_model))
        )
    )
    proc = subprocess.Popen(
        _cli(spec, tmp / "cache", "--no-progress"),
        cwd=ROOT,
        env=_env(tmp / "cache"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # the test's signals go to this job only
    )
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any("Replica" in name for name, *_ in _names(_tree(root))):
            break
        time.sleep(0.5)
    if proc.poll() is not None:
        pytest.fail(f"the job ended before it could be inspected: {proc.communicate()[1][-2000:]!r}")
    time.sleep(2)  # let the replica's worker open its server
    return proc, root


def _stop(proc: subprocess.Popen, procs: list[Any]) -> None:
    psutil = _psutil()
    for p in reversed(procs):
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def running_job(tiny_model, tmp_path_factory) -> Iterator[tuple[subprocess.Popen, Any, Path]]:
    tmp = tmp_path_factory.mktemp("running-job")
    proc, root = _start_job(tiny_model, tmp)
    procs = _tree(root)
    yield proc, root, tmp
    _stop(proc, procs + _tree(root))


def _names(procs: list[Any]) -> list[tuple[str]]:
    psutil = _psutil()
    out = []
    for p in procs:
        try:
            out.append((p.name(),))
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_embedded_cluster_listens_on_loopback_only(running_job):
    _, root, _ = running_job
    listening = _listening(_tree(root))
    names = {name for name, *_ in listening}
    # Ray's servers are all there (so this looked at the right processes) ...
    assert {"gcs_server", "raylet"} <= names, listening
    assert any(name.startswith("ray::") for name in names), listening
    # ... and none of them can be reached from another host.
    exposed = [s for s in listening if not _is_loopback(s[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_mid_job_leaves_no_ray_process(running_job):
    psutil = _psutil()
    proc, root, tmp = running_job
    procs = _tree(root)[1:]
    names = [name for (name,) in _names(procs)]
    assert "raylet" in names and "gcs_server" in names and any("Replica" in n for n in names), names
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    # Ended by the signal, mid-job: not a success, not Ray's C++ abort (SIGABRT, a stack dump) as before.
    assert proc.returncode == -signal.SIGTERM
    assert not (tmp / "out" / "_SUCCESS").exists()
    _, alive = psutil.wait_procs(procs, timeout=20)
    alive = [(p.pid, n) for p, (n,) in zip(alive, _names(alive), strict=False)]
    assert alive == [], f"still running 20 s after SIGTERM: {alive}"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkilled_driver_leaves_no_ray_process(tiny_model, tmp_path):
    """A driver cannot clean up after SIGKILL (or the OOM killer): the watchdog it started does."""
    psutil = _psutil()
    proc, root = _start_job(tiny_model, tmp_path)
    procs = _tree(root)[1:]
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        _, alive = psutil.wait_procs(procs, timeout=20)
        alive = [(p.pid, n) for p, (n,) in zip(alive, _names(alive), strict=False)]
        assert alive == [], f"still running 20 s after SIGKILL: {alive}"
    finally:
        _stop(proc, procs)


# Ray's own console lines seen on every run before: the token notice, the actor-constructor warning with
# its issue link, Ray Data's "Progress bars disabled", the C++ "[... E ...] core_worker.cc" format.
_RAY_MARKERS = ("WARNING", "(raylet)", "ray.", "Progress bars", "token", "object store", ".cc:", "***")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_successful_run_console_shows_only_shardwise_lines(tiny_model, tmp_path):
    write_texts_parquet(tmp_path / "in.parquet", make_texts(100, seed=8))
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump(
            job_dict(
                input_uri=str(tmp_path / "in.parquet"),
                output_uri=str(tmp_path / "out"),
                model=str(tiny_model),
            )
        )
    )
    proc = subprocess.run(
        _cli(spec, tmp_path / "cache"),
        cwd=ROOT,
        env=_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln]
    assert any(ln.startswith("succeeded: 100 rows ok") for ln in lines), lines
    assert any(ln.startswith("shardwise:") for ln in lines), lines  # the progress bar is still shown
    foreign = [ln for ln in lines if not ln.startswith(("shardwise:", "succeeded:"))]
    assert foreign == [], foreign
    assert [ln for ln in lines if any(m in ln for m in _RAY_MARKERS)] == []
    # Ray's lines went to the run's log file instead.
    logs = list((tmp_path / "cache" / "logs").glob("*.log"))
    assert len(logs) == 1 and oct(logs[0].stat().st_mode & 0o777) == "0o600"


def test_quiet_console_splits_ray_output_from_shardwise_output(tmp_path):
    code = (
        "import os, sys\n"
        "from pipeline.cluster import quiet_console\n"
        f"path = quiet_console(log_dir=__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "os.write(2, b'[2026 E 1 1] core_worker.cc:1: from C++\\n')\n"
        "print('shardwise: 10 rows', file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "shardwise: 10 rows\n"
    (log,) = tmp_path.glob("*.log")
    assert "core_worker.cc:1: from C++" in log.read_text()


def test_log_rotation_deletes_only_shardwise_logs(tmp_path):
    """The log folder may sit in a user's folder (SHARDWISE_CACHE): rotation keeps the newest 20 of
    shardwise's own `<time>-<pid>.log` files and never touches other files."""
    code = (
        "import pathlib, sys\n"
        "from pipeline.cluster import quiet_console\n"
        f"quiet_console(log_dir=pathlib.Path({str(tmp_path)!r}))\n"
    )
    for i in range(25):
        (tmp_path / f"20260101T0000{i:02d}-1.log").write_text("old")
    (tmp_path / "notes.log").write_text("mine")
    (tmp_path / "20260101-mine.log").write_text("mine too")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "notes.log" in names and "20260101-mine.log" in names
    ours = [n for n in names if n.startswith("20260101T")]
    assert ours == [f"20260101T0000{i:02d}-1.log" for i in range(5, 25)]  # the 5 oldest went
    assert len([n for n in names if n.startswith("2026120")]) <= 1  # this run's own file
