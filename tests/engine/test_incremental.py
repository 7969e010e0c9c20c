"""`output.mode: incremental`: a dataset that grows by files is annotated run by run; only new files are
computed, old parts stay untouched, and the result equals a clean run over everything."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from jobs.cli import main
from pipeline.commit import read_output
from pipeline.errors import FingerprintMismatch, SourceError
from pipeline.execute import run_inference
from pipeline.spec import parse_spec
from tests.helpers import make_text_classifier, make_texts, write_texts_parquet

pytestmark = pytest.mark.timeout(420)


def _day(root: Path, day: int, *, rows: int = 60) -> Path:
    """A day's partition folder (`date=2026-12-0N/part-0.parquet`), ids unique across days."""
    texts = make_texts(rows, seed=100 + day)
    path = root / f"date=2026-12-{day:02d}" / "part-0.parquet"
    write_texts_parquet(path, texts)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    table = table.set_column(0, "id", pa.array([day * 1000 + i for i in range(rows)], pa.int64()))
    pq.write_table(table, path)
    return path


def _spec(root: Path, out: Path, model: Path, *, mode: str = "incremental") -> dict:
    return {
        "name": "daily",
        "input": {"uri": str(root), "id_column": "id", "keep_columns": ["id", "date"], "shard_rows": 25},
        "stages": [
            {"name": "s", "task": "text-classification", "model": str(model), "inputs": {"text": "text"}}
        ],
        "output": {"uri": str(out), "mode": mode},
    }


def _parts(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("part-*.parquet"))}


def _runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_runs").glob("*.json"))]


def test_new_files_only_and_equal_to_a_clean_run(ray_session, tiny_model, tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for day in (1, 2, 3):
        _day(raw, day)
    spec = parse_spec(_spec(raw, out, tiny_model))
    first = run_inference(spec, progress=False)
    assert (first.state, first.shards_run, first.rows_ok) == ("succeeded", 9, 180)
    before = _parts(out)
    for day in (4, 5):
        _day(raw, day)
    second = run_inference(spec, progress=False)
    assert (second.state, second.shards_run, second.rows_run, second.rows_ok) == ("succeeded", 6, 120, 300)
    after = _parts(out)
    assert {k: after[k] for k in before} == before  # old parts untouched (same bytes, same mtime)
    log = _runs(out)
    assert [len(r["files_added"]) for r in log] == [3, 2]
    assert log[1]["files_added"] == ["date=2026-12-04/part-0.parquet", "date=2026-12-05/part-0.parquet"]
    assert (log[1]["shards_run"], log[1]["rows_ok"]) == (6, 120)
    # A rerun with nothing new: no shard is computed and no file is opened to count rows.
    third = run_inference(spec, progress=False)
    assert (third.state, third.shards_run, third.rows_ok) == ("succeeded", 0, 300)
    # The same as one clean run over all five days (the hive partition `date` is a column).
    clean = run_inference(
        parse_spec(_spec(raw, tmp_path / "clean", tiny_model, mode="resume")), progress=False
    )
    assert clean.rows_ok == 300
    got = read_output(str(out)).sort_by("id")
    want = read_output(str(tmp_path / "clean")).sort_by("id")
    assert got.column_names == want.column_names == ["id", "date", "label", "score"]
    assert got.column("id").to_pylist() == want.column("id").to_pylist()
    assert got.column("label").to_pylist() == want.column("label").to_pylist()
    assert got.column("score").to_pylist() == pytest.approx(want.column("score").to_pylist(), abs=1e-6)
    assert set(got.column("date").to_pylist()) == {f"2026-12-0{d}" for d in range(1, 6)}
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "succeeded" in shown and "2 file(s) added" in shown


def test_changed_and_deleted_files_follow_the_policy(ray_session, tiny_model, tmp_path):
    """A done file that changed is refused by name (its old predictions cannot be replaced atomically);
    a done file that disappeared keeps its predictions and the run log says so."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    paths = [_day(raw, day, rows=30) for day in (1, 2)]
    spec = parse_spec(_spec(raw, out, tiny_model))
    run_inference(spec, progress=False)
    st = paths[0].stat()
    write_texts_parquet(paths[0], make_texts(31, seed=9))
    with pytest.raises(SourceError, match=r"date=2026-12-01/part-0.parquet.*changed since an earlier run"):
        run_inference(spec, progress=False)
    os.remove(paths[0])
    _day(raw, 3, rows=30)
    result = run_inference(spec, progress=False)
    assert (result.state, result.shards_run, result.rows_ok) == ("succeeded", 2, 90)
    assert _runs(out)[-1]["files_removed"] == ["date=2026-12-01/part-0.parquet"]
    assert len(read_output(str(out))) == 90 and st.st_size > 0


def test_a_changed_model_is_refused(ray_session, tiny_model, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _day(raw, 1, rows=30)
    run_inference(parse_spec(_spec(raw, out, tiny_model)), progress=False)
    _day(raw, 2, rows=30)
    other = make_text_classifier(tmp_path / "other", num_labels=3, seed=11)
    with pytest.raises(FingerprintMismatch, match="model changed"):
        run_inference(parse_spec(_spec(raw, out, other)), progress=False)
    # --overwrite starts the output again with the new model over all files.
    result = run_inference(parse_spec(_spec(raw, out, other)), progress=False, overwrite=True)
    assert (result.shards_run, result.rows_ok) == (4, 60)


def test_two_concurrent_incremental_runs_write_each_row_once(ray_session, tiny_model, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for day in (1, 2, 3, 4):
        _day(raw, day, rows=100)
    spec = parse_spec(_spec(raw, out, tiny_model))
    results: dict = {}

    def run(key: str) -> None:
        try:
            results[key] = run_inference(spec, progress=False, wait_s=300)
        except BaseException as e:  # noqa: BLE001
            results[key] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    assert all(not isinstance(r, BaseException) for r in results.values()), results
    assert sorted(r.shards_run for r in results.values()) == [0, 16]  # one computed, the other found it done
    ids = read_output(str(out)).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 400
