"""Jobs whose input and output are both `s3://` (a moto S3 server), through the Ray workers, for every input
format: the predictions read back from S3 by id equal a local run's on the same rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.commit import OutputDir
from pipeline.execute import run_inference
from pipeline.spec import parse_spec
from tests.engine.readback import assert_each_id_once, predictions_by_id
from tests.helpers import make_texts

pytestmark = pytest.mark.timeout(240)

N = 60
TEXTS = make_texts(N, seed=80, max_words=40)


def _spec(input_uri: str, fmt: str, output_uri: str, model: Path, storage_options: dict[str, Any]):
    return parse_spec(
        {
            "name": f"s3-{fmt}",
            "input": {
                "uri": input_uri,
                "format": fmt,
                "id_column": "id",
                "shard_rows": 25,
                "storage_options": storage_options,
            },
            "stages": [
                {
                    "name": "s",
                    "task": "text-classification",
                    "model": str(model),
                    "inputs": {"text": "text"},
                    "batch_size": 8,
                }
            ],
            "output": {"uri": output_uri, "storage_options": storage_options},
        }
    )


@pytest.fixture(scope="module")
def local_reference(ray_session, tiny_model, tmp_path_factory) -> dict[int, dict[str, Any]]:
    root = tmp_path_factory.mktemp("s3-reference")
    pq.write_table(pa.table({"id": list(range(N)), "text": TEXTS}), root / "in.parquet")
    run_inference(
        _spec(str(root / "in.parquet"), "parquet", str(root / "out"), tiny_model, {}), progress=False
    )
    return predictions_by_id(str(root / "out"))


def _upload(fmt: str, fs: Any, prefix: str, tmp_path: Path) -> str:
    """Write the rows in `fmt` under s3://<prefix>/ and return the input URI."""
    table = pa.table({"id": list(range(N)), "text": TEXTS})
    if fmt == "parquet":
        pq.write_table(table, tmp_path / "rows.parquet", row_group_size=20)
        fs.put_file(str(tmp_path / "rows.parquet"), f"{prefix}/rows.parquet")
        return f"s3://{prefix}/rows.parquet"
    if fmt == "jsonl":
        lines = "".join(json.dumps(row) + "\n" for row in table.to_pylist())
        fs.pipe_file(f"{prefix}/rows.jsonl", lines.encode())
        return f"s3://{prefix}/rows.jsonl"
    if fmt == "csv":
        pacsv.write_csv(table, tmp_path / "rows.csv")
        fs.put_file(str(tmp_path / "rows.csv"), f"{prefix}/rows.csv")
        return f"s3://{prefix}/rows.csv"
    import datasets

    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf"))
    fs.put(str(tmp_path / "hf"), f"{prefix}/hf", recursive=True)
    return f"s3://{prefix}/hf"


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "hf"])
def test_s3_input_and_output_match_a_local_run(
    ray_session, local_reference, tiny_model, s3_bucket, s3_storage_options, tmp_path, fmt
):
    import fsspec

    fs = fsspec.filesystem("s3", **s3_storage_options)
    input_uri = _upload(fmt, fs, f"{s3_bucket}/in", tmp_path)
    output_uri = f"s3://{s3_bucket}/out/{fmt}"
    result = run_inference(_spec(input_uri, fmt, output_uri, tiny_model, s3_storage_options), progress=False)

    assert (result.state, result.rows_in, result.rows_ok, result.rows_error) == ("succeeded", N, N, 0)
    out = OutputDir(output_uri, storage_options=s3_storage_options)
    assert out.exists("_SUCCESS") and len(out.committed()) == result.shards_total > 1
    manifest = out.read_json("_manifest.json")
    assert (manifest["state"], manifest["rows_ok"], manifest["rows_error"]) == ("succeeded", N, 0)
    assert_each_id_once(output_uri, range(N), storage_options=s3_storage_options)
    got = predictions_by_id(output_uri, storage_options=s3_storage_options)
    for i, want in local_reference.items():
        assert got[i]["label"] == want["label"], i
        assert got[i]["score"] == pytest.approx(want["score"], abs=1e-5), i
