"""pipeline.commit: shard files are committed whole and exactly once; resume sees only committed shards; an
output of another job is never mixed with this one's. Run on a local disk, memory:// and a real S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.bind import bind
from pipeline.commit import ERROR_SCHEMA, OUTPUT_FORMAT, OutputDir, ShardRecord, read_errors, read_output
from pipeline.errors import FingerprintMismatch, OutputError
from pipeline.plan import fingerprint
from pipeline.sources import Fragment
from pipeline.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]


def _preds(ids: list[str]) -> pa.Table:
    return pa.table(
        {
            "id": ids,
            "label": ["pos" if i % 2 else "neg" for i in range(len(ids))],
            "score": [0.5 + i / 100 for i in range(len(ids))],
        }
    )


FP = "fp"


def _errors(ids: list[str]) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "id": ids,
            "input_file": ["in.parquet"] * n,
            "input_row": list(range(n)),
            "stage": ["s"] * n,
            "step": ["preprocess"] * n,
            "error_type": ["InvalidInput"] * n,
            "message": ["input 'text' is null"] * n,
        },
        schema=ERROR_SCHEMA,
    )


NO_ERRORS = ERROR_SCHEMA.empty_table()


@pytest.fixture(params=["local", "memory", "s3"])
def out_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(uri, storage_options) of a fresh output location on each kind of filesystem."""
    if request.param == "local":
        yield str(tmp_path / "out"), {}
    elif request.param == "memory":
        root = f"/sw-out-{uuid.uuid4().hex[:8]}"
        yield f"memory://{root}/out", {}
        memory = fsspec.filesystem("memory")
        if memory.exists(root):
            memory.rm(root, recursive=True)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}/jobs/out", request.getfixturevalue("s3_storage_options")


def _out(out_uri: tuple[str, dict[str, Any]]) -> OutputDir:
    return OutputDir(out_uri[0], storage_options=out_uri[1])


def _names(out: OutputDir, rel: str = "") -> list[str]:
    return sorted(out._listdir(rel))


def _record_dict(rec: ShardRecord) -> dict[str, Any]:
    return json.loads(json.dumps(rec.__dict__))


# --- commit_shard ----------------------------------------------------------------------------------------


def test_commit_writes_part_errors_and_record(out_uri: tuple[str, dict[str, Any]]) -> None:
    """One shard → its predictions, its error records and a commit record that describes the part file."""
    out = _out(out_uri)
    preds, errs = _preds(["a", "b", "c"]), _errors(["d"])
    rec = out.commit_shard("00003", run_id="run-1", fingerprint=FP, predictions=preds, errors=errs)

    assert _names(out) == ["_errors", "_shards", "part-00003.parquet"]
    assert _names(out, "_errors") == ["part-00003.parquet"]
    assert _names(out, "_shards") == ["00003.json"]
    data = out.fs.cat_file(out.path("part-00003.parquet"))
    assert pq.read_table(pa.BufferReader(data)).equals(preds)
    assert (rec.shard_id, rec.run_id, rec.rows_in, rec.rows_ok, rec.rows_error) == ("00003", "run-1", 4, 3, 1)
    assert rec.bytes == len(data) and rec.sha256 == hashlib.sha256(data).hexdigest()
    assert out.read_json("_shards/00003.json") == _record_dict(rec)
    assert out.committed() == {"00003": rec}


def test_commit_without_bad_rows_writes_no_error_file(out_uri: tuple[str, dict[str, Any]]) -> None:
    out = _out(out_uri)
    rec = out.commit_shard("00000", run_id="r", fingerprint=FP, predictions=_preds(["a"]), errors=NO_ERRORS)
    assert rec.rows_error == 0 and rec.rows_in == 1
    assert "_errors" not in _names(out)
    assert read_errors(out_uri[0], storage_options=out_uri[1]).num_rows == 0


def test_repeated_commit_is_idempotent(out_uri: tuple[str, dict[str, Any]]) -> None:
    """A retried task rewrites the same names with the same bytes: one part file, same checksum."""
    out = _out(out_uri)
    preds, errs = _preds([f"r{i}" for i in range(50)]), _errors(["x", "y"])
    first = out.commit_shard("00001", run_id="attempt-1", fingerprint=FP, predictions=preds, errors=errs)
    part1 = out.fs.cat_file(out.path("part-00001.parquet"))
    err1 = out.fs.cat_file(out.path("_errors", "part-00001.parquet"))
    second = OutputDir(out_uri[0], storage_options=out_uri[1]).commit_shard(
        "00001", run_id="attempt-2", fingerprint=FP, predictions=preds, errors=errs
    )
    assert out.fs.cat_file(out.path("part-00001.parquet")) == part1
    assert out.fs.cat_file(out.path("_errors", "part-00001.parquet")) == err1
    assert (second.sha256, second.bytes) == (first.sha256, first.bytes)
    assert _names(out) == ["_errors", "_shards", "part-00001.parquet"]
    assert out.committed()["00001"].run_id == "attempt-2"
    assert read_output(out_uri[0], storage_options=out_uri[1]).num_rows == 50


def test_local_commit_leaves_no_temp_files(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    for i in range(3):
        out.commit_shard(
            f"{i:05d}", run_id="r", fingerprint=FP, predictions=_preds(["a"]), errors=_errors(["b"])
        )
    leftovers = [p for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_local_commit_that_dies_before_rename_is_invisible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task killed mid-commit leaves no file that a Parquet reader of the output would pick up."""
    out = OutputDir(str(tmp_path / "out"))
    out.commit_shard("00000", run_id="r", fingerprint=FP, predictions=_preds(["a", "b"]), errors=NO_ERRORS)

    def killed(src: str, dst: str) -> None:
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        out.commit_shard("00001", run_id="r", fingerprint=FP, predictions=_preds(["c"]), errors=NO_ERRORS)
    monkeypatch.undo()
    assert sorted(pq.read_table(tmp_path / "out").column("id").to_pylist()) == ["a", "b"]
    assert sorted(out.committed()) == ["00000"]
    assert read_output(str(tmp_path / "out")).column("id").to_pylist() == ["a", "b"]


@pytest.mark.parametrize("compression", ["zstd", "snappy", "gzip", "none"])
def test_compression_is_applied(tmp_path: Path, compression: str) -> None:
    out = OutputDir(str(tmp_path / "out"), compression=compression)
    out.commit_shard("00000", run_id="r", fingerprint=FP, predictions=_preds(["a", "b"]), errors=NO_ERRORS)
    meta = pq.ParquetFile(tmp_path / "out" / "part-00000.parquet").metadata
    expected = "UNCOMPRESSED" if compression == "none" else compression.upper()
    assert meta.row_group(0).column(0).compression == expected


def test_output_dir_pickles_without_its_filesystem(tmp_path: Path) -> None:
    """Workers receive the OutputDir by pickle and commit through their own filesystem."""
    out = OutputDir(str(tmp_path / "out") + "/", storage_options={"auto_mkdir": True}, compression="gzip")
    out.exists()  # resolves the filesystem
    clone = pickle.loads(pickle.dumps(out))
    assert (clone.uri, clone.storage_options, clone.compression) == (
        str(tmp_path / "out"),
        {"auto_mkdir": True},
        "gzip",
    )
    clone.commit_shard("00000", run_id="r", fingerprint=FP, predictions=_preds(["a"]), errors=NO_ERRORS)
    assert set(out.committed()) == {"00000"}


# --- committed -------------------------------------------------------------------------------------------


def test_committed_ignores_a_record_without_its_part_file(out_uri: tuple[str, dict[str, Any]]) -> None:
    """A record is trusted only with its part file: a lost part means the shard is computed again."""
    out = _out(out_uri)
    for sid in ("00000", "00001", "00002"):
        out.commit_shard(sid, run_id="r", fingerprint=FP, predictions=_preds([sid]), errors=NO_ERRORS)
    out.fs.rm(out.path("part-00001.parquet"))
    out.write_bytes("_shards/notes.txt", b"not a record")
    assert sorted(out.committed()) == ["00000", "00002"]


def test_committed_needs_the_record(out_uri: tuple[str, dict[str, Any]]) -> None:
    """A part file without a record (a task that died before its record) is not committed."""
    out = _out(out_uri)
    out.commit_shard("00000", run_id="r", fingerprint=FP, predictions=_preds(["a"]), errors=NO_ERRORS)
    out.write_bytes("part-00001.parquet", out.fs.cat_file(out.path("part-00000.parquet")))
    assert sorted(out.committed()) == ["00000"]


def test_committed_on_a_missing_output_is_empty(out_uri: tuple[str, dict[str, Any]]) -> None:
    assert _out(out_uri).committed() == {}


@pytest.mark.parametrize("out_uri", ["local", "s3"], indirect=True)  # memory:// is private to one process
def test_driver_sees_commits_of_other_processes(out_uri: tuple[str, dict[str, Any]]) -> None:
    """Workers are other processes: shards they commit after the driver listed the output are seen.

    (Object-store filesystems cache listings per process; the driver's `committed()` must not serve a stale
    listing from `prepare()`.)
    """
    uri, opts = out_uri
    driver = OutputDir(uri, storage_options=opts)
    driver.write_manifest(
        {"format": OUTPUT_FORMAT, "kind": "inference", "fingerprint": "fp", "fingerprint_parts": {}}
    )
    driver.commit_shard("00000", run_id="r", fingerprint=FP, predictions=_preds(["a"]), errors=NO_ERRORS)
    assert set(driver.prepare(fingerprint="fp", parts={}, mode="resume")) == {"00000"}
    worker = (
        "import json, sys, pyarrow as pa\n"
        "from pipeline.commit import ERROR_SCHEMA, OutputDir\n"
        "out = OutputDir(sys.argv[1], storage_options=json.loads(sys.argv[2]))\n"
        "for sid in ('00001', '00002'):\n"
        "    out.commit_shard(sid, run_id='w', fingerprint='fp', predictions=pa.table({'id': [sid]}), errors=ERROR_SCHEMA.empty_table())\n"
    )
    subprocess.run([sys.executable, "-c", worker, uri, json.dumps(opts)], cwd=REPO, check=True, timeout=120)
    assert sorted(driver.committed()) == ["00000", "00001", "00002"]


# --- prepare: resume, overwrite, error-if-exists, fingerprints -------------------------------------------


def _job(params: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    spec = parse_spec(
        {
            "name": "j",
            "input": {"uri": "in.parquet"},
            "output": {"uri": "out"},
            "stages": [
                {
                    "name": "s",
                    "task": "text-classification",
                    "model": "m",
                    "inputs": {"text": "text"},
                    "params": params or {},
                }
            ],
        }
    )
    frags = [Fragment("/d/in.parquet", "in.parquet", 100, "v1", 10, 10.0)]
    return fingerprint(
        bind(spec), frags, model_identities={"s": {"model": "m", "weights": {"model.safetensors": "h"}}}
    )


def _start(out: OutputDir, fp: str, parts: dict[str, Any]) -> None:
    """What the driver does after prepare(): record the job in the manifest."""
    out.write_manifest(
        {
            "format": OUTPUT_FORMAT,
            "kind": "inference",
            "fingerprint": fp,
            "fingerprint_parts": parts,
            "state": "running",
        }
    )


def test_resume_returns_committed_shards_of_the_same_job(out_uri: tuple[str, dict[str, Any]]) -> None:
    out = _out(out_uri)
    fp, parts = _job()
    assert out.prepare(fingerprint=fp, parts=parts, mode="resume") == {}
    _start(out, fp, parts)
    recs = {
        sid: out.commit_shard(sid, run_id="r1", fingerprint=fp, predictions=_preds([sid]), errors=NO_ERRORS)
        for sid in ("00000", "00002")
    }
    again = OutputDir(out_uri[0], storage_options=out_uri[1])
    assert again.prepare(fingerprint=fp, parts=parts, mode="resume") == recs
    assert again.read_json("_manifest.json")["fingerprint"] == fp


def test_resume_refuses_a_different_job(out_uri: tuple[str, dict[str, Any]]) -> None:
    """Another job's output is never mixed in: the error says what changed and how to go on."""
    out = _out(out_uri)
    fp, parts = _job({"top_k": 1})
    _start(out, fp, parts)
    out.commit_shard("00000", run_id="r", fingerprint=FP, predictions=_preds(["a"]), errors=NO_ERRORS)
    fp2, parts2 = _job({"top_k": 2})
    with pytest.raises(FingerprintMismatch) as info:
        out.prepare(fingerprint=fp2, parts=parts2, mode="resume")
    message = str(info.value)
    assert isinstance(info.value, OutputError)
    assert "the stages.s.params changed" in message
    assert "--overwrite" in message and "output.mode: overwrite" in message
    assert fp[:12] in message and fp2[:12] in message
    assert out.exists("part-00000.parquet")  # nothing was touched


def test_mismatch_names_every_changed_part(out_uri: tuple[str, dict[str, Any]]) -> None:
    out = _out(out_uri)
    fp, parts = _job()
    _start(out, fp, parts)
    stage = {**parts["stages"]["s"], "task": "token-classification", "model": {"model": "other"}}
    changed = {**parts, "stages": {"s": stage}, "plan": 0}
    with pytest.raises(FingerprintMismatch, match=r"the plan, stages.s.task, stages.s.model changed"):
        out.prepare(fingerprint="f" * 64, parts=changed, mode="resume")


def test_mismatch_with_a_manifest_without_parts(out_uri: tuple[str, dict[str, Any]]) -> None:
    out = _out(out_uri)
    out.write_manifest({"format": OUTPUT_FORMAT, "kind": "inference", "fingerprint": "0" * 64})
    fp, parts = _job()
    with pytest.raises(FingerprintMismatch, match="--overwrite"):
        out.prepare(fingerprint=fp, parts=parts, mode="resume")


def test_overwrite_removes_everything(out_uri: tuple[str, dict[str, Any]]) -> None:
    out = _out(out_uri)
    fp, parts = _job()
    _start(out, fp, parts)
    out.commit_shard("00000", run_id="r", fingerprint=FP, predictions=_preds(["a"]), errors=_errors(["b"]))
    out.write_success()
    fp2, parts2 = _job({"top_k": 3})
    assert out.prepare(fingerprint=fp2, parts=parts2, mode="overwrite") == {}
    assert not out.has_content()
    assert out.committed() == {}
    assert out.prepare(fingerprint=fp2, parts=parts2, mode="overwrite") == {}  # also on nothing


def test_error_if_exists(out_uri: tuple[str, dict[str, Any]]) -> None:
    out = _out(out_uri)
    fp, parts = _job()
    assert out.prepare(fingerprint=fp, parts=parts, mode="error-if-exists") == {}
    _start(out, fp, parts)
    with pytest.raises(OutputError, match="error-if-exists") as info:
        out.prepare(fingerprint=fp, parts=parts, mode="error-if-exists")
    assert "'resume'" in str(info.value) and "'overwrite'" in str(info.value)


def test_error_if_exists_accepts_an_empty_local_directory(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    fp, parts = _job()
    assert OutputDir(str(tmp_path / "out")).prepare(fingerprint=fp, parts=parts, mode="error-if-exists") == {}


def test_resume_refuses_records_without_a_manifest(out_uri: tuple[str, dict[str, Any]]) -> None:
    out = _out(out_uri)
    out.commit_shard("00000", run_id="r", fingerprint=FP, predictions=_preds(["a"]), errors=NO_ERRORS)
    fp, parts = _job()
    for mode in ("resume", "overwrite"):  # no manifest: not provably ours, so not deleted either
        with pytest.raises(OutputError, match="no _manifest.json"):
            out.prepare(fingerprint=fp, parts=parts, mode=mode)
    assert out.exists("part-00000.parquet")


def test_resume_refuses_foreign_parquet_files(out_uri: tuple[str, dict[str, Any]]) -> None:
    out = _out(out_uri)
    out.write_bytes("data.parquet", b"PAR1")
    fp, parts = _job()
    for mode in ("resume", "overwrite", "error-if-exists"):
        with pytest.raises(OutputError, match=r"did not write \(data.parquet\)"):
            out.prepare(fingerprint=fp, parts=parts, mode=mode)
    assert out.exists("data.parquet")


# --- manifest, _SUCCESS, reading back --------------------------------------------------------------------


def test_manifest_and_success_marker(out_uri: tuple[str, dict[str, Any]]) -> None:
    out = _out(out_uri)
    assert out.read_json("_manifest.json") is None
    out.write_manifest({"fingerprint": "abc", "shards": {"00000": {"rows_ok": 3}}, "state": "running"})
    assert out.read_json("_manifest.json") == {
        "fingerprint": "abc",
        "shards": {"00000": {"rows_ok": 3}},
        "state": "running",
    }
    out.write_success()
    assert out.exists("_SUCCESS")
    out.clear_success()
    assert not out.exists("_SUCCESS")
    out.clear_success()  # no marker: nothing to do


def test_read_output_and_errors_in_shard_order(out_uri: tuple[str, dict[str, Any]]) -> None:
    uri, opts = out_uri
    out = _out(out_uri)
    out.commit_shard(
        "00002", run_id="r", fingerprint=FP, predictions=_preds(["e", "f"]), errors=_errors(["g"])
    )
    out.commit_shard("00000", run_id="r", fingerprint=FP, predictions=_preds(["a", "b"]), errors=NO_ERRORS)
    out.commit_shard(
        "00001", run_id="r", fingerprint=FP, predictions=_preds(["c", "d"]), errors=_errors(["x", "y"])
    )
    out.write_manifest({"fingerprint": "abc"})
    out.write_success()
    table = read_output(uri, storage_options=opts)
    assert table.column("id").to_pylist() == ["a", "b", "c", "d", "e", "f"]
    assert table.column_names == ["id", "label", "score"]
    errors = read_errors(uri, storage_options=opts)
    assert errors.schema == ERROR_SCHEMA
    assert errors.column("id").to_pylist() == ["x", "y", "g"]


def test_read_output_of_nothing(out_uri: tuple[str, dict[str, Any]]) -> None:
    uri, opts = out_uri
    with pytest.raises(OutputError, match="holds no part files"):
        read_output(uri, storage_options=opts)
    empty = read_errors(uri, storage_options=opts)
    assert empty.num_rows == 0 and empty.schema == ERROR_SCHEMA


def test_output_directory_reads_as_a_parquet_dataset(tmp_path: Path) -> None:
    """Any Parquet reader pointed at the output reads just the predictions (`_` entries are skipped)."""
    out = OutputDir(str(tmp_path / "out"))
    out.commit_shard(
        "00000", run_id="r", fingerprint=FP, predictions=_preds(["a", "b"]), errors=_errors(["c"])
    )
    out.commit_shard("00001", run_id="r", fingerprint=FP, predictions=_preds(["d"]), errors=NO_ERRORS)
    out.write_manifest({"fingerprint": "abc"})
    out.write_success()
    assert sorted(pq.read_table(tmp_path / "out").column("id").to_pylist()) == ["a", "b", "d"]
