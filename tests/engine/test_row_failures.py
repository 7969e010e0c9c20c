"""A row that fails in any step (preprocess, forward in the replica, postprocess) is one error record with
that step and the exception — never silently dropped — and costs only itself: every other row gets the
prediction a plain text-classification job gives.

The failures come from `test-faulty` (tests/engine/faulty_task.py), which Ray workers import through the
registry's SHARDWISE_TASK_MODULES hook (set by the `ray_session` fixture).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.execute import run_inference
from pipeline.spec import parse_spec
from tests.engine import faulty_task
from tests.engine.readback import errors_by_id, predictions_by_id
from tests.helpers import job_dict, make_texts, write_texts_parquet

# Two jobs each; generous for a loaded shared machine (measured ~25 s per test when it is idle).
pytestmark = pytest.mark.timeout(480)

N = 60  # three 20-row shards
# row id → (marker word, stage of its error record, error_type, message)
FAULTS = {
    # Shard 0 holds two preprocess failures, shard 2 one: the batch raises, the rows are retried one by one.
    2: ("FAIL_PREPROCESS", "preprocess", "PreprocessFault", "preprocess failed on row 2"),
    9: ("FAIL_PREPROCESS", "preprocess", "PreprocessFault", "preprocess failed on row 9"),
    45: ("FAIL_PREPROCESS", "preprocess", "PreprocessFault", "preprocess failed on row 45"),
    5: ("FAIL_FORWARD", "forward", "ForwardFault", "forward failed on row 5"),
    30: ("FAIL_FORWARD", "forward", "ForwardFault", "forward failed on row 30"),
    21: ("FAIL_POSTPROCESS", "postprocess", "PostprocessFault", "postprocess failed on row 21"),
    50: ("FAIL_POSTPROCESS", "postprocess", "PostprocessFault", "postprocess failed on row 50"),
}
# A task that returns too few results for its rows: the rows without one are error records too.
SHORT = {12: "SHORT_FORWARD", 55: "SHORT_PREPROCESS"}
# A runner that returns an empty output for a row: "no output" (MissingOutput).
EMPTY = {33: "EMPTY_FORWARD"}


def _texts() -> list[str]:
    texts = make_texts(N, seed=50, max_words=30)
    for i, (marker, *_) in FAULTS.items():
        texts[i] = f"{texts[i]} {marker}"
    for i, marker in {**SHORT, **EMPTY}.items():
        texts[i] = f"{texts[i]} {marker}"
    return texts


def _spec(tmp_path: Path, model: Path, task: str, out: str):
    return parse_spec(
        job_dict(
            input_uri=str(tmp_path / "in.parquet"),
            output_uri=str(tmp_path / out),
            model=str(model),
            task=task,
            input={"uri": str(tmp_path / "in.parquet"), "id_column": "id", "shard_rows": 20},
            max_error_rate=0.5,
        )
    )


def test_rows_failing_in_each_step_are_error_records_and_only_they_fail(ray_session, tiny_model, tmp_path):
    assert faulty_task.FaultyTextClassification.name == "test-faulty"  # registered in this process too
    write_texts_parquet(tmp_path / "in.parquet", _texts())
    plain = run_inference(_spec(tmp_path, tiny_model, "text-classification", "plain"), progress=False)
    assert (plain.rows_ok, plain.rows_error) == (N, 0)

    result = run_inference(_spec(tmp_path, tiny_model, "test-faulty", "out"), progress=False)

    bad = set(FAULTS) | set(SHORT) | set(EMPTY)
    assert (result.rows_in, result.rows_error, result.rows_ok) == (N, len(bad), N - len(bad))
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["state"] == "succeeded" and (tmp_path / "out" / "_SUCCESS").exists()
    assert manifest["rows_ok"] + manifest["rows_error"] == N and manifest["rows_error"] == len(bad)

    errors = errors_by_id(str(tmp_path / "out"))
    assert set(errors) == bad  # each failed row exactly once (errors_by_id checks for duplicates)
    for i, (_, stage, error_type, message) in FAULTS.items():
        assert (errors[i]["step"], errors[i]["error_type"], errors[i]["message"]) == (
            stage,
            error_type,
            message,
        ), i
    # A result count that does not match the rows is the step's own error, on just the row left out.
    assert errors[12]["step"] == "forward" and "0 outputs for 1 rows" in errors[12]["message"]
    assert errors[55]["step"] == "preprocess" and "0 results for 1 rows" in errors[55]["message"]
    # An empty output reaches no postprocess: "no output", not a lost row.
    assert errors[33]["error_type"] == "MissingOutput" and errors[33]["step"] in ("forward", "postprocess")

    got = predictions_by_id(str(tmp_path / "out"))
    want = predictions_by_id(str(tmp_path / "plain"))
    assert set(got) == set(range(N)) - bad
    for i, row in got.items():
        assert row["label"] == want[i]["label"], i
        assert row["score"] == pytest.approx(want[i]["score"], abs=1e-6), i


def test_a_shard_with_a_single_row_that_fails_is_an_error_record(ray_session, tiny_model, tmp_path):
    """One row in a shard: no batch to fall back from, the row's exception is its record (`n == 1`)."""
    texts = make_texts(3, seed=51)
    texts[1] += " FAIL_PREPROCESS"
    texts[2] += " SHORT_PREPROCESS"
    write_texts_parquet(tmp_path / "in.parquet", texts)
    spec = parse_spec(
        job_dict(
            input_uri=str(tmp_path / "in.parquet"),
            output_uri=str(tmp_path / "out"),
            model=str(tiny_model),
            task="test-faulty",
            input={"uri": str(tmp_path / "in.parquet"), "id_column": "id", "shard_rows": 1},
            max_error_rate=1.0,
        )
    )
    result = run_inference(spec, progress=False)
    assert (result.shards_total, result.rows_ok, result.rows_error) == (3, 1, 2)
    errors = errors_by_id(str(tmp_path / "out"))
    assert (
        errors[1]["error_type"] == "PreprocessFault" and errors[1]["message"] == "preprocess failed on row 1"
    )
    assert errors[2]["step"] == "preprocess" and "0 results for 1 rows" in errors[2]["message"]
    assert set(predictions_by_id(str(tmp_path / "out"))) == {0}
