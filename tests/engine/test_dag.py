"""Multi-stage jobs (DAGs): chains and fan-out in one streaming graph, with the output contract held.

Tiny real models (a trained-tokenizer BERT classifier, a tiny GPT-2) run on the session's embedded Ray. Each
stage's outputs are compared with the same task run in-process on the same values (the single-stage path
without Ray; single-stage jobs are held to it by the task tests).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from jobs.cli import main
from pipeline.commit import OutputDir, read_errors, read_output
from pipeline.execute import run_inference
from pipeline.metrics import FLUSH_ENV, list_runs, read_events, read_run, read_summary, summarise
from pipeline.spec import parse_spec
from pipeline.status import output_status
from tests.engine.metrics_checks import assert_run_metrics
from tests.engine.procs import cli, committed, pids_matching, wait_for
from tests.engine.readback import assert_each_id_once, errors_by_id, predictions_by_id
from tests.helpers import make_texts, write_texts_parquet
from tests.models.gen_helpers import make_causal_lm
from tests.models.nlp_helpers import run_task_in_process

GEN_PARAMS = {
    "max_new_tokens": 6,
    "do_sample": False,
    "return_full_text": False,
    "handle_long_generation": "error",
}
NULL_ROW, FORWARD_FAIL_ROW, LONG_ROW = 3, 7, 11


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    # 64 positions: a 70-word prompt plus 6 new tokens does not fit, so the gen stage refuses it.
    return make_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), positions=64)


def _texts(n: int, seed: int) -> list[Any]:
    texts: list[Any] = make_texts(n, seed=seed, max_words=12)  # at most ~40 tokens: fits gen's 64
    texts[NULL_ROW] = None  # fails in the first stage that reads it, once
    texts[FORWARD_FAIL_ROW] = "FAIL_FORWARD " + texts[FORWARD_FAIL_ROW]  # fails in `check`'s forward step
    texts[LONG_ROW] = " ".join(["film"] * 70)  # passes `check`, fails in `gen`'s preprocess (too long)
    return texts


def _dag(inp: Path, out: Path, classifier: Path, gpt2: Path, **stage_kw: Any) -> dict[str, Any]:
    """check (fan-out root, on text) · gen (on text) → cls (on gen's generated text)."""
    return {
        "name": "dag",
        "input": {"uri": str(inp), "id_column": "id", "shard_rows": 20},
        "stages": [
            {"name": "check", "task": "test-faulty", "model": str(classifier), "inputs": {"text": "text"}},
            {
                "name": "gen",
                "task": "text-generation",
                "model": str(gpt2),
                "inputs": {"text": "text"},
                "params": GEN_PARAMS,
                "batch_size": 8,
                **stage_kw.get("gen", {}),
            },
            {
                "name": "cls",
                "task": "text-classification",
                "model": str(classifier),
                "inputs": {"text": "gen.generated_text"},
                "params": {"top_k": 2},
            },
        ],
        "output": {"uri": str(out)},
        "max_error_rate": 0.2,
    }


def _expected_errors() -> dict[int, tuple[str, str]]:
    return {
        NULL_ROW: ("check", "preprocess"),
        FORWARD_FAIL_ROW: ("check", "forward"),
        LONG_ROW: ("gen", "preprocess"),
    }


@pytest.mark.timeout(300)
def test_chain_and_fan_out_match_each_stage_alone(ray_session, tiny_model, tiny_gpt2, tmp_path, capsys):
    """One job, three stages: every stage's fields equal the task run alone on the same values; a bad row
    fails once, at the first stage that cannot take it, and later stages skip it; counts add up per stage;
    the workers got bound stages (`test-faulty` refuses to parse params in a worker); no stage is fused into
    a replica pool."""
    n = 90
    texts = _texts(n, seed=31)
    inp = write_texts_parquet(tmp_path / "in.parquet", texts, row_group_size=20)
    out = tmp_path / "out"
    result = run_inference(parse_spec(_dag(inp, out, tiny_model, tiny_gpt2)), progress=False)

    assert (result.rows_in, result.rows_ok, result.rows_error) == (n, n - 3, 3)
    assert_each_id_once(str(out), range(n))
    errors = errors_by_id(str(out))
    assert {i: (e["stage"], e["step"]) for i, e in errors.items()} == _expected_errors()
    assert errors[LONG_ROW]["error_type"] == "InputTooLong"

    # One struct column per stage, named after it; a flat view names fields <stage>.<field>.
    table = read_output(str(out))
    assert table.column_names == ["id", "check", "gen", "cls"]
    assert pa.types.is_struct(table.schema.field("cls").type)
    flat = read_output(str(out), flat=True)
    assert {"check.label", "gen.generated_text", "cls.label", "cls.score"} <= set(flat.column_names)

    preds = predictions_by_id(str(out))
    ok = sorted(preds)
    # check == text-classification on the texts (test-faulty wraps it; markers only fail their rows)
    want = run_task_in_process("text-classification", tiny_model, {}, {"text": [texts[i] for i in ok]})
    assert [preds[i]["check"]["label"] for i in ok] == [w["label"] for w in want]
    assert [preds[i]["check"]["score"] for i in ok] == pytest.approx([w["score"] for w in want], abs=1e-5)
    # gen == text-generation on the texts
    want = run_task_in_process("text-generation", tiny_gpt2, GEN_PARAMS, {"text": [texts[i] for i in ok]})
    generated = [preds[i]["gen"]["generated_text"] for i in ok]
    assert generated == [w["generated_text"] for w in want]
    # cls (chained) == text-classification on gen's generated texts
    want = run_task_in_process("text-classification", tiny_model, {"top_k": 2}, {"text": generated})
    assert [preds[i]["cls"]["label"] for i in ok] == [w["label"] for w in want]
    assert [preds[i]["cls"]["score"] for i in ok] == pytest.approx([w["score"] for w in want], abs=1e-5)

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["stages"] == {
        "check": {"rows_in": n, "rows_ok": n - 2, "rows_error": 2},
        "gen": {"rows_in": n - 2, "rows_ok": n - 3, "rows_error": 1},
        "cls": {"rows_in": n - 3, "rows_ok": n - 3, "rows_error": 0},
    }
    # `status` reads the same per-stage counts from the commit records on storage
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"stage gen: {n - 2} rows in, {n - 3} ok, 1 errors" in printed
    assert output_status(str(out))["stages"] == manifest["stages"]
    operators = [line for line in result.graph_stats.splitlines() if line.startswith("Operator")]
    pools = [op for op in operators if "Replica[" in op]
    assert len(pools) == 3, operators
    assert all("->" not in op.split(":")[0] for op in pools), (
        f"a CPU step was fused into a replica pool: {pools}"
    )
    # Job metrics: every stage's steps, counts that add up to the commit and error records, a summary.
    summary = assert_run_metrics(
        str(out),
        result.run_id,
        ["check", "gen", "cls"],
        unit=dict.fromkeys(["check", "gen", "cls"], "tokens"),
    )
    assert summary["state"] == "succeeded" and summary["stages"]["gen"]["forward"]["rows_per_batch_mean"] <= 8


def test_changing_one_stage_is_refused_naming_it(ray_session, tiny_model, tiny_gpt2, tmp_path):
    """Resume compares the whole DAG: another stage's params are refused, naming the stage."""
    inp = write_texts_parquet(
        tmp_path / "in.parquet", make_texts(20, seed=2, max_words=10), row_group_size=20
    )
    out = tmp_path / "out"
    job = _dag(inp, out, tiny_model, tiny_gpt2)
    run_inference(parse_spec(job), progress=False)
    job["stages"][2]["params"] = {"top_k": 1}
    from pipeline.errors import FingerprintMismatch

    with pytest.raises(FingerprintMismatch, match=r"stages\.cls\.params changed"):
        run_inference(parse_spec(job), progress=False)
    assert len(read_output(str(out))) == 20  # untouched


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_middle_stage_replica_sigkilled_loses_nothing(ray_session, tiny_model, tiny_gpt2, tmp_path):
    """SIGKILL the replica of the middle stage (gen) mid-job: Ray restarts it, the shards it held are redone,
    and every row is in the output once, with the predictions an undisturbed run gives."""
    n = 400
    texts = _texts(n, seed=33)
    inp = write_texts_parquet(tmp_path / "in.parquet", texts, row_group_size=20)
    out = tmp_path / "out"
    job = _dag(inp, out, tiny_model, tiny_gpt2, gen={"batch_size": 2})
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = run_inference(parse_spec(job), progress=False)
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
            outcome["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    wait_for(lambda: committed(out) >= 3 and pids_matching("Replica[gen]"), timeout=240, what="3 commits")
    killed = pids_matching("Replica[gen]")
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    at_kill = committed(out)
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert killed and at_kill < result.shards_total, "the kill must land mid-job"
    assert (result.rows_in, result.rows_error) == (n, 3)
    assert_each_id_once(str(out), range(n))
    preds = predictions_by_id(str(out))
    ok = sorted(preds)
    generated = [preds[i]["gen"]["generated_text"] for i in ok]
    want = run_task_in_process("text-generation", tiny_gpt2, GEN_PARAMS, {"text": [texts[i] for i in ok]})
    assert generated == [w["generated_text"] for w in want]


@pytest.mark.timeout(480)
def test_three_stage_job_driver_sigkilled_resumes_exactly_once(tiny_model, tiny_gpt2, tmp_path, monkeypatch):
    """The CLI runs a 3-stage job on its own embedded cluster (sized for the three pools on this 2-core
    machine); its driver and cluster are SIGKILLed at about half; the rerun computes exactly the shards that
    were not committed, and every row is in the output once. `gen` feeds `cls` without being written."""
    n = 600
    inp = write_texts_parquet(tmp_path / "in.parquet", _texts(n, seed=35), row_group_size=30)
    out = tmp_path / "out"
    job = _dag(inp, out, tiny_model, tiny_gpt2, gen={"output": False})
    job["input"]["shard_rows"] = 30
    spec_path = tmp_path / "dag.yaml"
    spec_path.write_text(yaml.safe_dump(job))
    total = n // 30

    monkeypatch.setenv(FLUSH_ENV, "1")  # the driver writes its metrics every second (default 30 s)
    proc = cli("run", str(spec_path), "--no-progress")
    try:
        wait_for(lambda: committed(out) >= total // 2 or proc.poll() is not None, timeout=360, what="half")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the driver must have been killed, not finished"
    time.sleep(1.0)
    before = {p.stem for p in (out / "_shards").glob("*.json")}
    assert 0 < len(before) < total
    # The killed run's metrics: what the driver drained is there, without a summary; summarise() reads it.
    [killed] = list_runs(str(out))
    assert read_summary(str(out), killed) is None
    drained = read_events(str(out), killed)
    commits = {e["shard"] for e in drained.to_pylist() if e["step"] == "commit"}
    assert commits and commits <= before
    assert summarise(drained, run=read_run(str(out), killed))["stages"]["cls"]["forward"]["micro_batches"] > 0

    rerun = cli("run", str(spec_path), "--no-progress")
    _, stderr = rerun.communicate(timeout=360)
    assert rerun.returncode == 0, stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    last = manifest["runs"][-1]
    recomputed = {k for k, rec in OutputDir(str(out)).committed().items() if rec.run_id == last["run_id"]}
    assert recomputed == {f"{i:05d}" for i in range(total)} - before
    assert last["shards_skipped"] == len(before) and last["shards_todo"] == total - len(before)
    assert manifest["state"] == "succeeded" and (manifest["rows_ok"], manifest["rows_error"]) == (n - 3, 3)
    assert manifest["stages"]["gen"]["rows_error"] == 1 and manifest["stages"]["check"]["rows_error"] == 2
    assert_each_id_once(str(out), range(n))
    assert read_output(str(out)).column_names == ["id", "check", "cls"]  # gen: output false
    assert len(read_errors(str(out))) == 3
    assert list_runs(str(out)) == [killed, last["run_id"]]
    assert read_summary(str(out))["state"] == "succeeded"
