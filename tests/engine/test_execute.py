"""End-to-end inference jobs on the embedded Ray cluster: parity, error records, resume, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.commit import OutputDir, read_errors, read_output
from pipeline.errors import ErrorRateExceeded, FingerprintMismatch, SpecError
from pipeline.execute import run_inference
from pipeline.metrics import list_runs, read_events, read_summary
from pipeline.spec import parse_spec
from tests.helpers import job_dict, make_texts, write_texts_parquet

pytestmark = pytest.mark.timeout(240)


def _spec(tmp_path: Path, model: Path, **kw):
    return parse_spec(
        job_dict(
            input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "out"), model=str(model), **kw
        )
    )


def _pipeline(model: Path, **kw):
    from transformers import pipeline

    return pipeline("text-classification", model=str(model), tokenizer=str(model), device="cpu", **kw)


@pytest.mark.parametrize(
    "params",
    [{}, {"top_k": None}, {"top_k": 2, "function_to_apply": "sigmoid"}],
    ids=["top1", "all-labels", "top2-sigmoid"],
)
def test_parity_with_transformers_pipeline(ray_session, tiny_model, tmp_path, params):
    """Same labels as transformers.pipeline and scores within 1e-4, for every row, whatever the batching."""
    texts = make_texts(150, seed=3, max_words=100) + [""]
    write_texts_parquet(tmp_path / "in.parquet", texts)
    spec = _spec(
        tmp_path,
        tiny_model,
        stages=[
            {
                "name": "s",
                "task": "text-classification",
                "model": str(tiny_model),
                "inputs": {"text": "text"},
                "params": params,
                "batch_size": 7,
            }
        ],
    )
    result = run_inference(spec, progress=False)
    assert (result.rows_ok, result.rows_error) == (len(texts), 0)
    got = read_output(str(tmp_path / "out")).sort_by("id").to_pylist()
    pipe_kwargs = {k: v for k, v in params.items()}
    pipe_kwargs.setdefault("top_k", 1)
    expected = _pipeline(tiny_model)(texts, batch_size=1, **pipe_kwargs)
    assert [r["id"] for r in got] == list(range(len(texts)))
    for row, exp in zip(got, expected, strict=True):
        assert row["label"] == exp[0]["label"]
        assert row["score"] == pytest.approx(exp[0]["score"], abs=1e-4)
        if params.get("top_k", 1) != 1:
            assert [s["label"] for s in row["scores"]] == [e["label"] for e in exp]
            assert [s["score"] for s in row["scores"]] == pytest.approx([e["score"] for e in exp], abs=1e-4)


def test_text_pair_parity(ray_session, tiny_model, tmp_path):
    texts = make_texts(40, seed=4)
    pairs = make_texts(40, seed=5)
    write_texts_parquet(tmp_path / "in.parquet", texts, extra={"pair": pairs})
    spec = _spec(
        tmp_path,
        tiny_model,
        stages=[
            {
                "name": "s",
                "task": "text-classification",
                "model": str(tiny_model),
                "inputs": {"text": "text", "text_pair": "pair"},
            }
        ],
    )
    run_inference(spec, progress=False)
    got = read_output(str(tmp_path / "out")).sort_by("id").to_pylist()
    pipe = _pipeline(tiny_model)
    for row, t, p in zip(got, texts, pairs, strict=True):
        exp = pipe({"text": t, "text_pair": p})
        assert row["label"] == exp["label"]
        assert row["score"] == pytest.approx(exp["score"], abs=1e-4)


def test_bad_rows_become_error_records_with_exact_counts(ray_session, tiny_model, tmp_path):
    """Nulls and non-strings are error records; empty strings are predictions; counts add up — also for a
    shard in which every row fails (rows 80-119 are the third of three 40-row shards)."""
    texts: list = make_texts(120, seed=6)
    bad = {5: None, 17: None, 60: None, **{i: None for i in range(80, 120)}}
    for i, v in bad.items():
        texts[i] = v
    texts[30] = ""
    write_texts_parquet(tmp_path / "in.parquet", texts)
    spec = _spec(tmp_path, tiny_model, max_error_rate=0.5)
    result = run_inference(spec, progress=False)
    assert (result.rows_in, result.rows_ok, result.rows_error) == (120, 77, 43)
    assert result.shards_total == 3 and pq.read_table(tmp_path / "out" / "part-00002.parquet").num_rows == 0
    errors = read_errors(str(tmp_path / "out"))
    assert sorted(int(i) for i in errors.column("id").to_pylist()) == sorted(bad)
    assert set(errors.column("step").to_pylist()) == {"preprocess"}
    assert all("null" in m for m in errors.column("message").to_pylist())
    preds = read_output(str(tmp_path / "out"))
    ids = preds.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 77 and 30 in ids
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["state"] == "succeeded" and manifest["rows_error"] == 43
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_jsonl_broken_lines_and_mixed_types_are_error_records(ray_session, tiny_model, tmp_path):
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(make_texts(30, seed=7))]
    lines[3] = '{"id": 3, "text": "unterminated'
    lines[8] = json.dumps({"id": 8, "text": 12345})
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    spec = parse_spec(
        job_dict(
            input_uri=str(tmp_path / "in.jsonl"),
            output_uri=str(tmp_path / "out"),
            model=str(tiny_model),
            max_error_rate=0.1,
        )
    )
    result = run_inference(spec, progress=False)
    assert (result.rows_ok, result.rows_error) == (28, 2)
    table = read_errors(str(tmp_path / "out"))
    # The id column keeps the input id column's name and type, so errors join back to the input.
    assert table.schema.field("id").type == pa.int64()
    errors = {(r["input_file"], r["input_row"]): r for r in table.to_pylist()}
    # A broken line has no readable id: its record has a null id and says where the row is.
    assert set(errors) == {("in.jsonl", 3), ("in.jsonl", 8)}
    assert errors[("in.jsonl", 3)]["id"] is None and errors[("in.jsonl", 8)]["id"] == 8
    assert {e["step"] for e in errors.values()} == {"read"}
    assert "holds a int" in errors[("in.jsonl", 8)]["message"]


def test_max_error_rate_exceeded_fails_loudly(ray_session, tiny_model, tmp_path):
    texts: list = make_texts(100, seed=8)
    for i in range(0, 100, 10):
        texts[i] = None  # 10% bad rows
    write_texts_parquet(tmp_path / "in.parquet", texts)
    spec = _spec(tmp_path, tiny_model, max_error_rate=0.05)
    with pytest.raises(ErrorRateExceeded, match="max_error_rate"):
        run_inference(spec, progress=False)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["state"] == "failed" and "max_error_rate" in manifest["reason"]
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_resume_recomputes_only_uncommitted_shards(ray_session, tiny_model, tmp_path):
    write_texts_parquet(tmp_path / "in.parquet", make_texts(400, seed=9))
    spec = _spec(tmp_path, tiny_model)
    first = run_inference(spec, progress=False, max_shards=3)
    assert first.state == "partial" and first.shards_run == 3
    second = run_inference(spec, progress=False)
    assert second.state == "succeeded"
    assert (second.shards_skipped, second.shards_run) == (3, second.shards_total - 3)
    shards = OutputDir(str(tmp_path / "out")).committed()
    by_run = {}
    by_run_shards: dict[str, list[str]] = {}
    for rec in shards.values():
        by_run.setdefault(rec.run_id, 0)
        by_run[rec.run_id] += 1
        by_run_shards.setdefault(rec.run_id, []).append(rec.shard_id)
    assert by_run == {first.run_id: 3, second.run_id: second.shards_total - 3}
    # Each run that computed shards has its own metrics folder, its events only of its own shards.
    out = str(tmp_path / "out")
    assert list_runs(out) == [first.run_id, second.run_id]
    assert read_summary(out, first.run_id)["state"] == "partial"
    assert read_summary(out)["run_id"] == second.run_id
    commits = read_events(out, second.run_id).filter(pc.equal(pc.field("step"), "commit"))
    assert sorted(commits.column("shard").to_pylist()) == sorted(by_run_shards[second.run_id])
    assert sum(commits.column("rows").to_pylist()) == second.rows_run
    third = run_inference(spec, progress=False)
    assert third.shards_run == 0 and third.rows_ok == 400
    assert list_runs(out) == [first.run_id, second.run_id]  # nothing to do: no Ray, no metrics
    ids = read_output(str(tmp_path / "out")).column("id").to_pylist()
    assert sorted(ids) == list(range(400))


def test_changed_job_is_refused_then_overwrite_recomputes(ray_session, tiny_model, tmp_path):
    write_texts_parquet(tmp_path / "in.parquet", make_texts(60, seed=10))
    run_inference(_spec(tmp_path, tiny_model), progress=False)
    changed = _spec(
        tmp_path,
        tiny_model,
        stages=[
            {
                "name": "s",
                "task": "text-classification",
                "model": str(tiny_model),
                "inputs": {"text": "text"},
                "params": {"top_k": 2},
            }
        ],
    )
    with pytest.raises(FingerprintMismatch, match="params") as err:
        run_inference(changed, progress=False)
    assert "--overwrite" in str(err.value)
    result = run_inference(changed, progress=False, overwrite=True)
    assert result.rows_ok == 60 and "scores" in read_output(str(tmp_path / "out")).column_names
    assert list_runs(str(tmp_path / "out")) == [result.run_id]  # --overwrite deleted the first run's metrics
    # Same job, changed input file: refused as well.
    write_texts_parquet(tmp_path / "in.parquet", make_texts(61, seed=10))
    with pytest.raises(FingerprintMismatch, match="input"):
        run_inference(changed, progress=False)


def test_hf_dataset_input_and_keep_columns(ray_session, tiny_model, tmp_path):
    import datasets

    texts = make_texts(70, seed=11)
    datasets.Dataset.from_dict({"text": texts, "source": ["x"] * 70}).save_to_disk(str(tmp_path / "hf"))
    spec = parse_spec(
        {
            "name": "hf",
            "input": {"uri": str(tmp_path / "hf"), "format": "hf", "keep_columns": ["text", "source"]},
            "stages": [
                {
                    "name": "s",
                    "task": "text-classification",
                    "model": str(tiny_model),
                    "inputs": {"text": "text"},
                }
            ],
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    run_inference(spec, progress=False)
    out = read_output(str(tmp_path / "out"))
    assert out.column_names == ["id", "text", "source", "label", "score"]
    assert sorted(out.column("text").to_pylist()) == sorted(texts)
    assert len(set(out.column("id").to_pylist())) == 70


def test_missing_column_is_a_spec_error_naming_the_key(tiny_model, tmp_path):
    write_texts_parquet(tmp_path / "in.parquet", make_texts(5))
    spec = parse_spec(
        job_dict(
            input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "out"), model=str(tiny_model)
        )
    )
    bad = parse_spec(
        {
            **job_dict(
                input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "o2"), model=str(tiny_model)
            ),
            "stages": [
                {
                    "name": "s",
                    "task": "text-classification",
                    "model": str(tiny_model),
                    "inputs": {"text": "body"},
                }
            ],
        }
    )
    assert spec.stage.inputs == {"text": "text"}
    with pytest.raises(SpecError, match=r"stages\[0\]\.inputs\.text.*'body'"):
        run_inference(bad, progress=False)


def test_output_part_files_are_plain_parquet(ray_session, tiny_model, tmp_path):
    """Any Parquet reader reads the output directory; engine files (_manifest, _errors) are skipped."""
    from ray.data import DataContext

    write_texts_parquet(tmp_path / "in.parquet", make_texts(130, seed=12))
    caller_block_size = DataContext.get_current().target_max_block_size
    run_inference(_spec(tmp_path, tiny_model), progress=False)
    # The job's Ray Data settings (no block splitting, no progress bars) do not leak into the caller's.
    assert DataContext.get_current().target_max_block_size == caller_block_size is not None
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 130 and table.schema.field("label").type == pa.string()
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet")) == [
        f"part-{i:05d}.parquet" for i in range(3)
    ]
