"""Fault tolerance: a SIGKILLed replica and a SIGKILLed driver lose and duplicate no row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.commit import OutputDir, read_output
from pipeline.execute import run_inference
from pipeline.spec import parse_spec
from tests.engine.procs import ROOT, cli, committed, pids_matching, wait_for
from tests.engine.readback import assert_each_id_once, errors_by_id, predictions_by_id
from tests.helpers import job_dict, make_texts, write_texts_parquet


@pytest.mark.slow
@pytest.mark.timeout(480)  # the killed run plus a clean run to compare with, on a shared 2-core machine
def test_replica_sigkilled_mid_job_loses_and_duplicates_nothing(ray_session, tiny_model, tmp_path):
    n = 1500
    texts: list = make_texts(n, seed=20, max_words=80)
    for i in range(0, n, 100):
        texts[i] = None  # some bad rows too: counts must still add up
    write_texts_parquet(tmp_path / "in.parquet", texts)
    job = job_dict(
        input_uri=str(tmp_path / "in.parquet"),
        output_uri=str(tmp_path / "out"),
        model=str(tiny_model),
        max_error_rate=0.05,
        stages=[
            {
                "name": "s",
                "task": "text-classification",
                "model": str(tiny_model),
                "inputs": {"text": "text"},
                "batch_size": 1,
            }
        ],
    )
    spec = parse_spec(job)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = run_inference(spec, progress=False)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
            outcome["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    out = tmp_path / "out"
    wait_for(
        lambda: committed(out) >= 4 and pids_matching("MapBatches(Replica["), timeout=180, what="4 commits"
    )
    killed = pids_matching("MapBatches(Replica[")
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    committed_at_kill = committed(out)
    worker.join(timeout=240)
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert killed and committed_at_kill < result.shards_total, "the kill must land mid-job"
    assert result.rows_in == n and result.rows_ok + result.rows_error == n and result.rows_error == n // 100
    assert_each_id_once(str(out), range(n))
    assert set(errors_by_id(str(out))) == set(range(0, n, 100))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["state"] == "succeeded" and (out / "_SUCCESS").exists()
    assert (manifest["rows_ok"], manifest["rows_error"]) == (n - n // 100, n // 100)
    # The rows a killed replica had in flight were recomputed: same predictions as an undisturbed run
    # (same batch_size, so the same micro-batches and the same numbers).
    clean_job = {**job, "output": {"uri": str(tmp_path / "clean")}}
    clean_job["stages"] = [{**job["stages"][0], "replicas": 2}]  # speed only: predictions do not depend on it
    clean = run_inference(parse_spec(clean_job), progress=False)
    assert clean.rows_ok == result.rows_ok
    got, want = predictions_by_id(str(out)), predictions_by_id(str(tmp_path / "clean"))
    assert set(got) == set(want)
    assert [got[i]["label"] for i in sorted(want)] == [want[i]["label"] for i in sorted(want)]
    assert [got[i]["score"] for i in sorted(want)] == pytest.approx(
        [want[i]["score"] for i in sorted(want)], abs=1e-6
    )


def _write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.timeout(420)
def test_driver_sigkilled_midway_resumes_only_uncommitted_shards(ray_session, tiny_model, tmp_path):
    n = 2000
    write_texts_parquet(tmp_path / "in.parquet", make_texts(n, seed=21, max_words=80))
    spec = job_dict(
        input_uri=str(tmp_path / "in.parquet"),
        output_uri=str(tmp_path / "out"),
        model=str(tiny_model),
        stages=[
            {
                "name": "s",
                "task": "text-classification",
                "model": str(tiny_model),
                "inputs": {"text": "text"},
                "batch_size": 1,
            }
        ],
    )
    spec_path = _write_spec(tmp_path / "job.yaml", spec)
    out = tmp_path / "out"
    total = n // 50

    proc = cli("run", str(spec_path), "--no-progress")
    try:
        wait_for(
            lambda: committed(out) >= total // 2 or proc.poll() is not None,
            timeout=300,
            what="half the shards",
        )
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded cluster it started
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the driver must have been killed, not finished"
    time.sleep(1.0)  # let the dead cluster's workers notice
    before = {p.stem for p in (out / "_shards").glob("*.json")}
    assert 0 < len(before) < total
    assert not (out / "_SUCCESS").exists()

    status = subprocess.run(
        [sys.executable, "-m", "jobs", "status", str(out), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    info = json.loads(status.stdout)
    # The killed driver's lease names a pid that is gone: nobody holds the output, so it is interrupted.
    assert (info["state"], status.returncode) == ("interrupted", 4) and info["shards_done"] == len(before)

    rerun = cli("run", str(spec_path), "--no-progress")
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    last_run = manifest["runs"][-1]["run_id"]
    recomputed = {k for k, rec in OutputDir(str(out)).committed().items() if rec.run_id == last_run}
    assert recomputed == {f"{i:05d}" for i in range(total)} - before
    assert manifest["runs"][-1]["shards_skipped"] == len(before)
    assert manifest["state"] == "succeeded" and manifest["rows_ok"] == n and (out / "_SUCCESS").exists()

    clean = parse_spec({**spec, "output": {"uri": str(tmp_path / "clean")}})
    run_inference(clean, progress=False)
    resumed = read_output(str(out)).sort_by("id").to_pylist()
    reference = read_output(str(tmp_path / "clean")).sort_by("id").to_pylist()
    assert [r["id"] for r in resumed] == list(range(n))
    assert [r["label"] for r in resumed] == [r["label"] for r in reference]
    assert [r["score"] for r in resumed] == pytest.approx([r["score"] for r in reference], abs=1e-6)
