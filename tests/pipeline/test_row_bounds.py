"""input.max_row_bytes at the read: a JSONL line over it is skipped in blocks (never held whole) and becomes one
error row; a Parquet/CSV/HF row whose text/binary cells are over it becomes an error row with its cells
nulled. Counts stay exact: the driver's row count includes the over-long line."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import SpecError
from pipeline.sources import list_fragments, read_range
from pipeline.spec import DEFAULT_MAX_ROW_BYTES, InputSpec, parse_spec
from tests.helpers import job_dict

MIB = 1 << 20


def _jsonl_lines(big: int) -> list[str]:
    """Rows 0..4 with an over-long row 2 (`big` bytes of text) and blank lines, one of them long."""
    return [
        json.dumps({"id": 10, "text": "first"}),
        "   ",
        json.dumps({"id": 11, "text": "second"}),
        json.dumps({"id": 12, "text": "x" * big}),
        "",
        " " * (2 * MIB),  # a blank line is no row, however long
        json.dumps({"id": 13, "text": "after"}),
        json.dumps({"id": 14, "text": "last, no newline"}),
    ]


@pytest.mark.parametrize("name", ["in.jsonl", "in.jsonl.gz"])
def test_jsonl_line_over_max_row_bytes_is_one_error_row(tmp_path: Path, name: str) -> None:
    text = "\n".join(_jsonl_lines(3 * MIB))
    if name.endswith(".gz"):
        with gzip.open(tmp_path / name, "wt") as f:
            f.write(text)
    else:
        (tmp_path / name).write_text(text)
    spec = InputSpec(uri=str(tmp_path / name), id_column="id", max_row_bytes=MIB, shard_rows=2)
    (fragment,) = list_fragments(spec)
    assert fragment.num_rows == 5  # the over-long line counts as a row; blank lines do not
    rows = []
    for start in range(0, 5, 2):  # shards of 2 rows, each seeking to its own offset
        table = read_range(spec, fragment.for_rows(start), start, min(start + 2, 5), columns=["text"])
        rows += table.to_pylist()
    assert [r["__row"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["text"] for r in rows] == ["first", "second", None, "after", "last, no newline"]
    errors = [r["__read_error"] for r in rows]
    assert errors[:2] == [None, None] and errors[3:] == [None, None]
    assert "row 2" in errors[2] and "input.max_row_bytes (1048576 bytes)" in errors[2]
    assert "raise input.max_row_bytes or fix the file" in errors[2]
    assert rows[2]["__id"] == f"{name}:2"  # the line was never parsed: its id is the row number


def test_jsonl_over_long_line_is_never_held_whole(tmp_path: Path) -> None:
    """Reading a shard with a 32 MiB line (limit 1 MiB) allocates a few MiB at most, not the line."""
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(_jsonl_lines(32 * MIB)) + "\n")
    spec = InputSpec(uri=str(path), id_column="id", max_row_bytes=MIB)
    (fragment,) = list_fragments(spec)
    read_range(spec, fragment, 0, 2, columns=["text"])  # warm up: first-call imports allocate too
    tracemalloc.start()
    try:
        table = read_range(spec, fragment, 0, 5, columns=["text"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert table.column("__read_error").null_count == 4
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB while reading past a 32 MiB line"


def test_jsonl_rows_at_the_limit_are_read(tmp_path: Path) -> None:
    line = json.dumps({"id": 1, "text": "y" * 100})
    (tmp_path / "in.jsonl").write_text(line + "\n" + line + "x\n")  # the second is 1 byte longer (and broken)
    spec = InputSpec(uri=str(tmp_path / "in.jsonl"), max_row_bytes=len(line))
    (fragment,) = list_fragments(spec)
    errors = read_range(spec, fragment, 0, 2, columns=None).column("__read_error").to_pylist()
    assert errors[0] is None and "max_row_bytes" in errors[1]


def test_parquet_cells_over_max_row_bytes_are_error_rows(tmp_path: Path) -> None:
    """Text and nested (chat) cells are counted; the oversized row's cells are nulled, its id kept."""
    chats = [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "y" * (MIB // 2)}, {"role": "assistant", "content": "z" * (MIB // 2)}],
        None,
        [{"role": "user", "content": "ok"}],
    ]
    texts = ["a", "b", "x" * (2 * MIB), "d"]
    table = pa.table({"id": ["r0", "r1", "r2", "r3"], "text": texts, "messages": chats, "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=2)
    spec = InputSpec(uri=str(tmp_path / "in.parquet"), id_column="id", max_row_bytes=MIB)
    (fragment,) = list_fragments(spec)
    for start in (0, 1):  # a slice that starts inside a row group too
        out = read_range(spec, fragment, start, 4, columns=None).to_pylist()
        by_id = {r["__id"]: r for r in out}
        assert by_id["r3"]["__read_error"] is None and by_id["r3"]["text"] == "d"
        # r1: 1 MiB of chat content + "user" + "assistant" + text "b" + id "r1": over 1 MiB
        assert "row 1 has 1048592 bytes" in by_id["r1"]["__read_error"] and by_id["r1"]["messages"] is None
        assert "row 2 has 2097154 bytes" in by_id["r2"]["__read_error"]
        assert by_id["r2"]["text"] is None and by_id["r2"]["n"] is None and by_id["r2"]["id"] == "r2"


def test_csv_cell_over_max_row_bytes_is_an_error_row(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("id,text\n1,short\n2," + "w" * 5000 + "\n3,fine\n")
    spec = InputSpec(uri=str(tmp_path / "in.csv"), id_column="id", max_row_bytes=1000)
    (fragment,) = list_fragments(spec)
    errors = read_range(spec, fragment, 0, 3, columns=["text"]).column("__read_error").to_pylist()
    assert errors[0] is None and errors[2] is None and "input.max_row_bytes (1000 bytes)" in errors[1]


def test_max_row_bytes_default_and_validation(tmp_path: Path) -> None:
    base = job_dict(input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "out"), model="m")
    assert parse_spec(base).input.max_row_bytes == DEFAULT_MAX_ROW_BYTES == 64 * MIB
    bad = {**base, "input": {**base["input"], "max_row_bytes": 0}}
    with pytest.raises(SpecError, match="input.max_row_bytes"):
        parse_spec(bad)


def test_jsonl_over_long_line_on_s3(s3_storage_options, s3_bucket) -> None:
    """Remote files (fsspec's buffered files, no readline(limit)) are read in bounded blocks too."""
    import fsspec

    uri = f"s3://{s3_bucket}/in.jsonl"
    with fsspec.open(uri, "w", **s3_storage_options) as f:
        f.write("\n".join(_jsonl_lines(3 * MIB)))
    spec = InputSpec(uri=uri, id_column="id", max_row_bytes=MIB, storage_options=s3_storage_options)
    (fragment,) = list_fragments(spec)
    table = read_range(spec, fragment, 0, 5, columns=["text"])
    assert table.column("text").to_pylist() == ["first", "second", None, "after", "last, no newline"]
    assert "input.max_row_bytes" in table.column("__read_error")[2].as_py()
