"""Bounded rows through real jobs: a 50 MB text costs what its clipped prefix costs and is predicted as that
prefix; a JSONL line over input.max_row_bytes is one error record while the other rows succeed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.text import clip_text
from pipeline.commit import read_errors, read_output
from pipeline.execute import run_inference
from pipeline.spec import parse_spec
from tests.helpers import job_dict, make_texts

pytestmark = pytest.mark.timeout(240)

MIB = 1 << 20
MAX_LENGTH = 128  # the tiny model's tokenizer.model_max_length and position embeddings


@pytest.fixture(scope="module")
def huge_text() -> str:
    """50 MB of ordinary words (a corpus pasted into one cell)."""
    base = " ".join(make_texts(400, seed=21))
    return (base * (50_000_000 // len(base) + 1))[:50_000_000]


def _write(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


def _run(tmp_path: Path, model: Path, input_path: Path, out: str, **input_keys) -> tuple[float, object]:
    spec = job_dict(
        input_uri=str(input_path), output_uri=str(tmp_path / out), model=str(model), max_error_rate=0.2
    )
    spec["input"].update(input_keys)
    started = time.perf_counter()
    result = run_inference(parse_spec(spec), progress=False)
    return time.perf_counter() - started, result


@pytest.mark.slow  # two jobs and a 50 MB file per format
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_50mb_row_is_predicted_as_its_clipped_prefix_in_seconds(
    ray_session, tiny_model, tmp_path, huge_text, suffix
):
    from transformers import pipeline

    small = [{"id": i, "text": t} for i, t in enumerate(make_texts(6, seed=22))]
    _write(tmp_path / f"small{suffix}", small)
    _write(tmp_path / f"big{suffix}", [*small[:3], {"id": 99, "text": huge_text}, *small[3:]])
    reference, _ = _run(tmp_path, tiny_model, tmp_path / f"small{suffix}", "out-small")
    seconds, result = _run(tmp_path, tiny_model, tmp_path / f"big{suffix}", "out-big")
    assert (result.rows_ok, result.rows_error) == (7, 0)
    # The same job without the 50 MB row is the baseline: the row itself costs under 5 s (it took 88 s).
    assert seconds - reference < 5.0, f"{seconds:.1f} s with the 50 MB row vs {reference:.1f} s without"
    preds = {r["id"]: r for r in read_output(str(tmp_path / "out-big")).to_pylist()}
    pipe = pipeline("text-classification", model=str(tiny_model), device="cpu")
    (expected,) = pipe([clip_text(huge_text, MAX_LENGTH)], truncation=True, max_length=MAX_LENGTH)
    assert preds[99]["label"] == expected["label"]
    assert preds[99]["score"] == pytest.approx(expected["score"], abs=1e-4)


def test_jsonl_line_over_max_row_bytes_is_one_error_record(ray_session, tiny_model, tmp_path):
    rows = [{"id": i, "text": t} for i, t in enumerate(make_texts(20, seed=23))]
    rows[7]["text"] = "word " * (3 * MIB // 5)  # a 3 MiB line
    _write(tmp_path / "in.jsonl", rows)
    _, result = _run(tmp_path, tiny_model, tmp_path / "in.jsonl", "out", max_row_bytes=MIB, shard_rows=8)
    assert (result.rows_in, result.rows_ok, result.rows_error) == (20, 19, 1)
    (error,) = read_errors(str(tmp_path / "out")).to_pylist()
    # The line was never parsed, so its id is unknown: the record says where the row is.
    assert (error["input_file"], error["input_row"], error["id"]) == ("in.jsonl", 7, None)
    assert error["step"] == "read"
    assert "input.max_row_bytes (1048576 bytes)" in error["message"]
    assert "raise input.max_row_bytes or fix the file" in error["message"]
    assert sorted(read_output(str(tmp_path / "out")).column("id").to_pylist()) == [
        i for i in range(20) if i != 7
    ]
