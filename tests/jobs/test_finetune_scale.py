"""Fine-tuning at cluster scale: gradient accumulation, class weights, the best epoch published with early
stopping, mid-epoch checkpoints, a worker SIGKILLed mid-epoch (max_failures), and a killed driver resumed.

A tiny BERT learns the word rule of tests/jobs/test_finetune.py on the session's embedded Ray."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import yaml

from jobs.cli import main
from jobs.finetune import run_finetune
from pipeline.spec import parse_spec
from pipeline.train.data import TrainingData
from pipeline.train.labels import class_weights
from tests.engine.procs import cli, pids_matching, wait_for
from tests.helpers import make_text_classifier, write_texts_parquet
from tests.jobs.ray_nodes import start_cluster
from tests.jobs.test_finetune import reviews


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_classifier(tmp_path_factory.mktemp("base"), num_labels=2)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts, labels = reviews(400, seed=3)
    return write_texts_parquet(
        tmp_path_factory.mktemp("data") / "train.parquet", texts, extra={"label": labels}
    )


def _spec(tmp: Path, base: Path, train_uri: Path, **train: Any) -> dict[str, Any]:
    return {
        "name": "scale-finetune",
        "kind": "finetune",
        "input": {"uri": str(train_uri), "id_column": "id"},
        "stages": [
            {"name": "clf", "task": "text-classification", "model": str(base), "inputs": {"text": "text"}}
        ],
        "output": {"uri": str(tmp / "model")},
        "train": {
            "epochs": 2,
            "lr": 2e-3,
            "batch_size": 16,
            "max_length": 32,
            "num_workers": 1,
            "eval_fraction": 0.1,
            "seed": 0,
            "checkpoint_uri": str(tmp / "ckpt"),  # kept after the run, so the test can look at it
            **train,
        },
    }


def _checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/checkpoint_*") if p.is_dir()) if root.exists() else []


def _registered(root: Path) -> int:
    """Checkpoints Ray Train's controller has registered (its snapshot file in the run folder)."""
    for snapshot in root.glob("*/checkpoint_manager_snapshot.json") if root.exists() else []:
        try:
            return len(json.loads(snapshot.read_text()).get("checkpoint_results") or [])
        except ValueError:  # being written
            return 0
    return 0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_balanced_class_weights() -> None:
    """n_rows / (n_classes × rows of the class), as sklearn's "balanced"; token lists count every tag."""
    spec = parse_spec(_spec(Path("/t"), Path("/m"), Path("/d.parquet"), class_weights="balanced"))
    # Per-class training rows come from the streaming pass (pipeline.train.data.prepare_data), not from rows.
    data = TrainingData(None, None, ("neg", "pos"), [], label_counts=(3, 1))
    assert class_weights(spec, data) == pytest.approx((4 / 6, 2.0))
    three = TrainingData(None, None, ("a", "b", "c"), [], label_counts=(2, 2, 0))
    assert class_weights(spec, three) == pytest.approx((4 / 6, 4 / 6, 0.0))  # a class with no rows: 0


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_accumulation_early_stopping_publishes_the_best_epoch(ray_session, base_model, train_file, tmp_path):
    """grad_accum_steps: one optimizer step per 2 micro-batches; early stopping after an epoch without a
    better eval score; the published weights are those of the best epoch's checkpoint, not the last."""
    spec = parse_spec(
        _spec(
            tmp_path,
            base_model,
            train_file,
            epochs=8,
            batch_size=8,
            grad_accum_steps=2,
            early_stopping_patience=1,
            class_weights="balanced",
            eval_fraction=0.05,  # 20 eval rows: the score saturates, so an epoch soon fails to improve it
        )
    )
    result = run_finetune(spec, progress=False)
    steps_per_epoch = math.ceil(math.ceil(result.train_rows / 8) / 2)
    epochs = result.metrics
    assert [r["steps"] for r in epochs] == [steps_per_epoch * (i + 1) for i in range(len(epochs))]
    metrics = json.loads((tmp_path / "model" / "train_metrics.json").read_text())
    # The score is the task's metric: macro-F1 for classification (sklearn), reported every epoch.
    assert all(r["score"] == r["eval_macro_f1"] for r in epochs)
    scores = [r["score"] for r in epochs]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert metrics["best_epoch"] == best + 1
    assert metrics["stopped_early"] and len(epochs) < 8, scores
    assert len(epochs) == best + 2  # patience 1: the first epoch that did not beat the best is the last
    assert max(scores) >= 0.8  # class-weighted loss still learns the rule
    # The published model is the best epoch's checkpoint (Ray Train kept it, and the latest for resume).
    published = _sha(tmp_path / "model" / "model.safetensors")
    by_epoch = {
        json.loads((c / "train_metrics.json").read_text())["epochs"][-1]["epoch"]: _sha(
            c / "model.safetensors"
        )
        for c in _checkpoints(tmp_path / "ckpt")
    }
    assert by_epoch[best + 1] == published and by_epoch[len(epochs)] != published


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_worker_sigkilled_mid_epoch_resumes_from_its_last_checkpoint(ray_session, base_model, tmp_path):
    """max_failures: 1 and a checkpoint every 10 steps: a Train worker SIGKILLed mid-epoch is restarted from
    the last mid-epoch checkpoint (its data position skips the batches it already trained on), the run
    finishes with every planned step, and the model still learns the rule."""
    texts, labels = reviews(1200, seed=4)
    train_uri = write_texts_parquet(tmp_path / "train.parquet", texts, extra={"label": labels})
    spec = parse_spec(
        _spec(
            tmp_path, base_model, train_uri, epochs=1, max_failures=1, checkpoint_every_steps=10, batch_size=4
        )
    )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = run_finetune(spec, progress=False)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            outcome["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    # Ray Train's controller has taken a checkpoint in (a written one it has not registered yet would be lost
    # with the worker, and the restart would begin from scratch).
    wait_for(lambda: _registered(tmp_path / "ckpt") >= 1, timeout=300, what="a registered checkpoint")
    killed = pids_matching("RayTrainWorker")
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    worker.join(timeout=400)
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert killed
    steps_per_epoch = math.ceil(result.train_rows / 4)
    resumed = [r["resumed_at_step"] for r in result.metrics if "resumed_at_step" in r]
    # restored from a mid-epoch checkpoint: at most 10 steps (plus the kill's latency) were redone
    assert len(resumed) == 1 and 0 < resumed[0] < steps_per_epoch and resumed[0] % 10 == 0, result.metrics
    # the steps trained after that checkpoint and lost with the worker are counted (the kill came after it)
    redone = [r["steps_redone"] for r in result.metrics if "steps_redone" in r]
    assert len(redone) == 1 and 0 <= redone[0] < steps_per_epoch - resumed[0], result.metrics
    assert result.metrics[-1]["steps"] == steps_per_epoch  # no step skipped or repeated in the count
    assert result.metrics[-1]["eval_accuracy"] >= 0.8
    print(  # the figures behind the assertions (pytest -s)
        f"\nworker SIGKILL: {len(killed)} worker(s) killed, resumed at step {resumed[0]} of {steps_per_epoch}, "
        f"{redone[0]} step(s) redone, eval accuracy {result.metrics[-1]['eval_accuracy']:.3f}"
    )


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_driver_killed_mid_run_resumes_from_the_last_checkpoint(base_model, train_file, tmp_path):
    """The CLI's driver (and its embedded cluster) SIGKILLed after the first epoch's checkpoint: the rerun
    continues from that checkpoint instead of starting over."""
    spec_path = tmp_path / "ft.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tmp_path, base_model, train_file, epochs=2, batch_size=8)))
    proc = cli("run", str(spec_path), "--no-progress")
    try:
        wait_for(
            lambda: _registered(tmp_path / "ckpt") >= 1 or proc.poll() is not None,
            timeout=300,
            what="the first epoch's checkpoint, registered",
        )
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the driver must have been killed, not finished"
    time.sleep(1.0)
    rerun = cli("run", str(spec_path), "--no-progress")
    _, stderr = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, stderr
    epochs = json.loads((tmp_path / "model" / "train_metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    resumed = [r for r in epochs if "resumed_at_step" in r]
    # the rerun started at epoch 2 from the first epoch's checkpoint (not from scratch)
    assert [(r["epoch"], r["resumed_at_step"]) for r in resumed] == [(2, epochs[0]["steps"])], epochs
    assert np.isfinite(epochs[-1]["train_loss"])
    print(  # the figures behind the assertions (pytest -s)
        f"\ndriver SIGKILL: rerun resumed at step {resumed[0]['resumed_at_step']} (epoch 2 of 2), "
        f"{resumed[0].get('steps_redone')} step(s) redone, final steps {epochs[-1]['steps']}"
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_cluster_with_checkpoints_on_s3(
    base_model, train_file, tmp_path, s3_server, s3_bucket, monkeypatch, capsys
):
    """A real 2-node cluster (`ray start` head + worker): `shardwise submit` sends the fine-tune to its job
    server; 2 DDP workers, placement spread (one per node), checkpoints and the published model on S3 (the
    moto server, through s3fs)."""
    options = {
        "endpoint_url": s3_server["endpoint_url"],
        "key": s3_server["key"],
        "secret": s3_server["secret"],
    }
    spec = _spec(tmp_path, base_model, train_file, epochs=3, num_workers=2, placement="spread")
    spec["train"]["checkpoint_uri"] = f"s3://{s3_bucket}/ckpt"
    spec["output"] = {"uri": f"s3://{s3_bucket}/model", "storage_options": options}
    spec_path = tmp_path / "ft.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    # The head has a spare CPU for Ray Data's reads; the worker node holds the second Train worker.
    cluster = start_cluster(pythonpath=str(Path(__file__).resolve().parents[2]), head_cpus=2, worker_cpus=1)
    try:
        monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        assert main(["submit", str(spec_path), "--local-paths-ok", "--address", cluster.address]) == 0
        job_id = capsys.readouterr().out.strip().splitlines()[-1]
        code = main(["jobs", "logs", job_id, "--follow", "--address", cluster.address])
        logs = capsys.readouterr().out
    finally:
        cluster.stop()
    assert code == 0, logs[-3000:]
    s3 = fsspec.filesystem("s3", **options)
    names = {p.rsplit("/", 1)[-1] for p in s3.find(f"{s3_bucket}/model")}
    assert {"model.safetensors", "config.json", "train_metrics.json", "_SUCCESS"} <= names
    metrics = json.loads(s3.cat(f"{s3_bucket}/model/train_metrics.json"))
    assert metrics["num_workers"] == 2 and [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3]
    assert all(r["nodes"] == 2 for r in metrics["epochs"])  # one worker on each node
    assert max(r["eval_accuracy"] for r in metrics["epochs"]) >= 0.7, metrics["epochs"]
    # The checkpoints went to S3 too (a checkpoint_uri is kept after the run).
    assert any(p.endswith("model.safetensors") for p in s3.find(f"{s3_bucket}/ckpt"))
