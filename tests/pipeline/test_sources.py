"""pipeline.sources: every format lists its files with exact row counts and reads exactly a shard's rows.

The contract a user relies on: `read_range(start, stop)` returns rows [start, stop) of the file in order,
with a stable `__id` (`<rel>:<row>`, or the id column's value), `__row`, and `__read_error` for rows that
could not be parsed. Local paths, `memory://` and `s3://` go through the same code.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.block import ID, READ_ERROR, ROW
from pipeline.errors import SourceError, SpecError
from pipeline.sources import Fragment, input_schema, list_fragments, read_range, read_table
from pipeline.spec import InputSpec

ENGINE = [ID, ROW, READ_ERROR]


def _rows(n: int, *, first: int = 0) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(first, first + n), pa.int64()),
            "text": [f"text {i}" for i in range(first, first + n)],
            "score": [i / 2 for i in range(first, first + n)],
        }
    )


def _write_jsonl(path: Path, rows: list[Any], *, raw_lines: dict[int, str] | None = None) -> Path:
    """One JSON object per line; raw_lines[i] is inserted as is as line i (broken or blank lines)."""
    lines = [json.dumps(r) for r in rows]
    for i, text in sorted((raw_lines or {}).items()):
        lines.insert(i, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _user_columns(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in ENGINE if c in table.column_names])


def _check_range(spec: InputSpec, frag: Fragment, expected: pa.Table, start: int, stop: int) -> None:
    """read_range(start, stop) == rows [start, stop) of `expected`, with __row and default __id."""
    got = read_range(spec, frag, start, stop, columns=expected.column_names)
    assert got.column_names == expected.column_names + ENGINE
    assert _user_columns(got).to_pylist() == expected.slice(start, stop - start).to_pylist()
    assert got.column(ROW).to_pylist() == list(range(start, stop))
    if spec.id_column is None:
        assert got.column(ID).to_pylist() == [f"{frag.rel}:{r}" for r in range(start, stop)]
    assert got.column(READ_ERROR).null_count == stop - start


# --- parquet ---------------------------------------------------------------------------------------------


def test_parquet_single_file(tmp_path: Path) -> None:
    """A file gives one fragment, named by its basename, with its row count, size and a version."""
    path = tmp_path / "in.parquet"
    pq.write_table(_rows(25), path)
    spec = InputSpec(uri=str(path))
    [frag] = list_fragments(spec)
    assert frag.rel == "in.parquet"
    assert frag.num_rows == 25
    assert frag.size == path.stat().st_size
    assert frag.version != ""
    assert frag.row_bytes > 0
    _check_range(spec, frag, _rows(25), 0, 25)
    _check_range(spec, frag, _rows(25), 7, 19)


def test_parquet_row_ranges_across_row_groups(tmp_path: Path) -> None:
    """Ranges that start, end or straddle row-group boundaries return exactly their rows."""
    path = tmp_path / "rg.parquet"
    expected = _rows(23)
    pq.write_table(expected, path, row_group_size=5)
    assert pq.ParquetFile(path).metadata.num_row_groups == 5
    spec = InputSpec(uri=str(path))
    [frag] = list_fragments(spec)
    for start in range(0, 23):
        for stop in range(start + 1, 24):
            _check_range(spec, frag, expected, start, stop)


def test_parquet_directory_lists_data_files_in_order(tmp_path: Path) -> None:
    """A directory gives its data files (nested too) sorted; `_`/`.` files and folders are skipped."""
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    (root / "_errors").mkdir()
    pq.write_table(_rows(3), root / "b.parquet")
    pq.write_table(_rows(4), root / "a.parquet")
    pq.write_table(_rows(5), root / "sub" / "c.pq")
    pq.write_table(_rows(6), root / "_errors" / "part-0.parquet")
    pq.write_table(_rows(7), root / ".hidden.parquet")
    (root / "_SUCCESS").write_bytes(b"")
    (root / "notes.txt").write_text("not data")
    frags = list_fragments(InputSpec(uri=str(root), format="parquet"))
    assert [(f.rel, f.num_rows) for f in frags] == [("a.parquet", 4), ("b.parquet", 3), ("sub/c.pq", 5)]


def test_parquet_glob(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    for i, n in enumerate([2, 3, 4]):
        pq.write_table(_rows(n), root / f"part-{i}.parquet")
    pq.write_table(_rows(9), root / "other.parquet")
    frags = list_fragments(InputSpec(uri=str(root / "part-*.parquet")))
    assert [(f.rel, f.num_rows) for f in frags] == [
        ("part-0.parquet", 2),
        ("part-1.parquet", 3),
        ("part-2.parquet", 4),
    ]


def test_glob_in_a_directory_name_gives_names_relative_to_the_fixed_part(tmp_path: Path) -> None:
    """Row ids use the file's name below the glob's fixed prefix, whatever the wildcard character."""
    for day in ("d1", "d2"):
        (tmp_path / day).mkdir()
        pq.write_table(_rows(2), tmp_path / day / "x.parquet")
    for pattern in ("d?/x.parquet", "d[12]/x.parquet", "d*/x.parquet"):
        frags = list_fragments(InputSpec(uri=str(tmp_path / pattern)))
        assert [f.rel for f in frags] == ["d1/x.parquet", "d2/x.parquet"], pattern


def test_file_uri_is_the_same_as_a_path(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(_rows(4), path)
    by_path = list_fragments(InputSpec(uri=str(path)))
    by_uri = list_fragments(InputSpec(uri=f"file://{path}"))
    assert [(f.rel, f.num_rows, f.size) for f in by_uri] == [(f.rel, f.num_rows, f.size) for f in by_path]


def test_id_column_values_become_ids(tmp_path: Path) -> None:
    """With id_column, `__id` is the column's value as a string (the same on every rerun)."""
    path = tmp_path / "in.parquet"
    pq.write_table(_rows(6, first=100), path)
    spec = InputSpec(uri=str(path), id_column="id")
    [frag] = list_fragments(spec)
    got = read_range(spec, frag, 2, 5, columns=["id", "text"])
    assert got.column(ID).to_pylist() == ["102", "103", "104"]
    assert got.column(ROW).to_pylist() == [2, 3, 4]


def test_id_column_is_read_even_when_not_asked_for(tmp_path: Path) -> None:
    """Ids come from the id column although `columns` only names the task's inputs."""
    path = tmp_path / "in.parquet"
    pq.write_table(_rows(4, first=10), path)
    spec = InputSpec(uri=str(path), id_column="id")
    [frag] = list_fragments(spec)
    got = read_range(spec, frag, 0, 2, columns=["text"])
    assert got.column_names == ["text", *ENGINE]
    assert got.column(ID).to_pylist() == ["10", "11"]


def test_default_ids_are_stable_across_reads(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(_rows(10), path)
    spec = InputSpec(uri=str(path))
    first = read_range(spec, list_fragments(spec)[0], 3, 8, columns=["text"]).column(ID).to_pylist()
    again = read_range(spec, list_fragments(spec)[0], 3, 8, columns=["text"]).column(ID).to_pylist()
    assert first == again == [f"in.parquet:{r}" for r in range(3, 8)]


def test_columns_none_reads_all_columns(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(_rows(3), path)
    spec = InputSpec(uri=str(path))
    got = read_range(spec, list_fragments(spec)[0], 0, 3, columns=None)
    assert got.column_names == ["id", "text", "score", *ENGINE]


# --- missing things are SourceErrors that name them ------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "hf", "jsonl", "csv"])
def test_missing_column_names_the_column(tmp_path: Path, fmt: str) -> None:
    spec, frag = _one_fragment(tmp_path, fmt, _rows(4))
    with pytest.raises(SourceError) as info:
        read_range(spec, frag, 0, 4, columns=["text", "label"])
    assert "['label']" in str(info.value)
    assert frag.rel in str(info.value)
    assert "'text'" in str(info.value)  # lists the columns there are


@pytest.mark.parametrize("fmt", ["parquet", "hf", "jsonl", "csv"])
def test_missing_id_column_names_the_column(tmp_path: Path, fmt: str) -> None:
    spec, frag = _one_fragment(tmp_path, fmt, _rows(4))
    spec = dataclasses.replace(spec, id_column="doc_id")
    for columns in (None, ["text"]):
        with pytest.raises(SourceError, match=r"\['doc_id'\]"):
            read_range(spec, frag, 0, 4, columns=columns)


def test_missing_input_names_the_uri(tmp_path: Path) -> None:
    uri = str(tmp_path / "nope.parquet")
    with pytest.raises(SourceError, match="does not exist") as info:
        list_fragments(InputSpec(uri=uri))
    assert uri in str(info.value)


def test_directory_without_matching_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a\n1\n")
    with pytest.raises(SourceError, match="matched no jsonl files"):
        list_fragments(InputSpec(uri=str(tmp_path / "d"), format="jsonl"))


def test_directory_needs_a_format() -> None:
    with pytest.raises(SpecError) as info:
        list_fragments(InputSpec(uri="some/dir"))
    assert info.value.key == "input.format"


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(SourceError, match="cannot read parquet file") as info:
        list_fragments(InputSpec(uri=str(path)))
    assert "broken.parquet" in str(info.value)


# --- hf (datasets.save_to_disk) --------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()


def _save_hf(path: Path, table: pa.Table, **kw: Any) -> Path:
    import datasets

    datasets.Dataset.from_dict(table.to_pydict()).save_to_disk(str(path), **kw)
    return path


def test_hf_dataset_folder(tmp_path: Path) -> None:
    """A `save_to_disk` folder: its Arrow files in state.json order, each with its own rows."""
    expected = _rows(11)
    path = _save_hf(tmp_path / "hf", expected, num_shards=2)
    spec = InputSpec(uri=str(path), format="hf")
    frags = list_fragments(spec)
    assert [f.rel for f in frags] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert sum(f.num_rows for f in frags) == 11
    got = pa.concat_tables([read_range(spec, f, 0, f.num_rows, columns=["id", "text"]) for f in frags])
    assert got.column("id").to_pylist() == list(range(11))
    first = frags[0].num_rows
    _check_range(spec, frags[1], expected.slice(first), 1, frags[1].num_rows)


def test_hf_shuffled_dataset_keeps_saved_order(tmp_path: Path) -> None:
    """What `ds[i]` shows is what shardwise reads (save_to_disk writes the shuffled order)."""
    import datasets

    ds = datasets.Dataset.from_dict(_rows(9).to_pydict()).shuffle(seed=1)
    ds.save_to_disk(str(tmp_path / "hf"))
    spec = InputSpec(uri=str(tmp_path / "hf"), format="hf", id_column="id")
    assert read_table(spec, columns=["id"]).column("id").to_pylist() == ds["id"][:]


def test_hf_dataset_dict_names_its_splits(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(_rows(3).to_pydict()),
        test=datasets.Dataset.from_dict(_rows(2).to_pydict()),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SourceError) as info:
        list_fragments(InputSpec(uri=str(tmp_path / "dd"), format="hf"))
    message = str(info.value)
    assert "DatasetDict" in message and "'train'" in message and "'test'" in message
    assert str(tmp_path / "dd" / "train") in message  # the fix: point at one split
    spec = InputSpec(uri=str(tmp_path / "dd" / "train"), format="hf")
    assert [f.num_rows for f in list_fragments(spec)] == [3]


def test_hf_folder_without_state_json(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(SourceError, match="no state.json"):
        list_fragments(InputSpec(uri=str(tmp_path / "x"), format="hf"))


# --- jsonl -----------------------------------------------------------------------------------------------


def test_jsonl_rows_blank_lines_and_broken_lines(tmp_path: Path) -> None:
    """Blank lines are not rows; a broken line is a row with `__read_error`; its neighbours are intact."""
    rows = [{"id": i, "text": f"t{i}"} for i in range(6)]
    # Line layout: t0, <blank>, t1, t2, {broken, t3, <spaces>, [list], t4, t5
    path = _write_jsonl(
        tmp_path / "in.jsonl", rows, raw_lines={1: "", 4: '{"id": 99, "text": ', 6: "   ", 7: "[1, 2]"}
    )
    spec = InputSpec(uri=str(path))
    [frag] = list_fragments(spec)
    assert frag.num_rows == 8  # 6 objects + the broken line + the list line
    got = read_range(spec, frag, 0, 8, columns=["id", "text"])
    assert got.column("id").to_pylist() == [0, 1, 2, None, 3, None, 4, 5]
    assert got.column("text").to_pylist() == ["t0", "t1", "t2", None, "t3", None, "t4", "t5"]
    errors = got.column(READ_ERROR).to_pylist()
    assert [i for i, e in enumerate(errors) if e is not None] == [3, 5]
    assert "must hold an object, got list" in errors[5]
    assert got.column(ID).to_pylist() == [f"in.jsonl:{r}" for r in range(8)]


@pytest.mark.parametrize("shard_rows", [1, 2, 3, 4, 7])
def test_jsonl_seeking_matches_a_full_read_for_every_range(tmp_path: Path, shard_rows: int) -> None:
    """Offsets let a shard seek to its rows; the rows are the same as reading the file from the start."""
    rows = [
        {"id": i, "text": "é" * (i % 4) + f"row {i}"} for i in range(13)
    ]  # multi-byte text: offsets are bytes
    path = _write_jsonl(tmp_path / "in.jsonl", rows, raw_lines={0: "", 5: "", 6: "{oops", 11: "\t"})
    spec = InputSpec(uri=str(path), shard_rows=shard_rows)
    [frag] = list_fragments(spec)
    assert frag.offset_every == shard_rows and len(frag.offsets) == -(-frag.num_rows // shard_rows)
    scan = dataclasses.replace(frag, offsets=(), offset_every=0)
    for start in range(frag.num_rows):
        for stop in range(start + 1, frag.num_rows + 1):
            seeked = read_range(spec, frag, start, stop, columns=["id", "text"])
            scanned = read_range(spec, scan, start, stop, columns=["id", "text"])
            assert seeked.to_pylist() == scanned.to_pylist(), (start, stop)
            assert seeked.column(ROW).to_pylist() == list(range(start, stop))


def test_jsonl_key_missing_in_some_rows_is_null(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": "a", "label": 1}, {"text": "b"}])
    spec = InputSpec(uri=str(path))
    got = read_range(spec, list_fragments(spec)[0], 0, 2, columns=["text", "label"])
    assert got.column("label").to_pylist() == [1, None]


def _read_column(tmp_path: Path, values: list[Any]) -> tuple[list[Any], list[str | None]]:
    path = _write_jsonl(tmp_path / f"mixed-{uuid.uuid4().hex[:6]}.jsonl", [{"x": v} for v in values])
    spec = InputSpec(uri=str(path))
    got = read_range(spec, list_fragments(spec)[0], 0, len(values), columns=["x"])
    return got.column("x").to_pylist(), got.column(READ_ERROR).to_pylist()


def test_jsonl_mixed_types_make_the_odd_rows_bad(tmp_path: Path) -> None:
    """A value of another type than most rows' is a bad row with a reason; the shard still reads."""
    values, errors = _read_column(tmp_path, ["a", 3, "b", None, "c"])
    assert values == ["a", None, "b", None, "c"]
    assert [e is not None for e in errors] == [False, True, False, False, False]
    assert "column 'x' holds a int here; other rows hold str" in errors[1]


@pytest.mark.parametrize(
    "values",
    [
        [{"k": 1}, {"k": "a"}, {"k": 2}],  # one Python type (dict), different insides
        [[1], ["a"], [2]],
        [1, 2**70, 3],  # beyond int64
    ],
    ids=["struct", "list", "overflow"],
)
def test_jsonl_values_arrow_cannot_mix_are_bad_rows_not_a_failed_shard(
    tmp_path: Path, values: list[Any]
) -> None:
    """Bad rows never stop a job: the odd value is an error row, the others are read."""
    got, errors = _read_column(tmp_path, values)
    assert [e is not None for e in errors] == [False, True, False]
    assert got[0] == values[0] and got[2] == values[2] and got[1] is None


def test_jsonl_type_tie_goes_to_the_first_type_seen(tmp_path: Path) -> None:
    """With as many rows of each type, which rows are bad does not depend on the process (retries agree)."""
    assert _read_column(tmp_path, ["a", 1])[0] == ["a", None]
    assert _read_column(tmp_path, [1, "a"])[0] == [1, None]


def test_jsonl_broken_line_keeps_an_id_with_id_column(tmp_path: Path) -> None:
    """A broken line has no id value; its error record still says which row it was."""
    path = _write_jsonl(tmp_path / "in.jsonl", [{"id": "a"}, {"id": "c"}], raw_lines={1: "{nope"})
    spec = InputSpec(uri=str(path), id_column="id")
    got = read_range(spec, list_fragments(spec)[0], 0, 3, columns=["id"])
    assert got.column(ID).to_pylist() == ["a", "in.jsonl:1", "c"]


@pytest.mark.parametrize(("suffix", "opener"), [(".jsonl.gz", gzip.open), (".jsonl.bz2", bz2.open)])
def test_jsonl_compressed(tmp_path: Path, suffix: str, opener: Any) -> None:
    path = tmp_path / f"in{suffix}"
    with opener(path, "wt") as f:
        f.write("".join(json.dumps({"id": i}) + "\n" for i in range(10)))
    spec = InputSpec(uri=str(path), shard_rows=3)
    [frag] = list_fragments(spec)
    assert frag.num_rows == 10
    assert read_range(spec, frag, 4, 9, columns=["id"]).column("id").to_pylist() == [4, 5, 6, 7, 8]


# --- csv -------------------------------------------------------------------------------------------------


def test_csv_rows_and_ranges(tmp_path: Path) -> None:
    expected = _rows(12)
    path = tmp_path / "in.csv"
    pacsv.write_csv(expected, path)
    spec = InputSpec(uri=str(path))
    [frag] = list_fragments(spec)
    assert frag.num_rows == 12
    for start, stop in [(0, 12), (0, 1), (5, 9), (11, 12)]:
        _check_range(spec, frag, expected, start, stop)


def test_csv_many_batches(tmp_path: Path) -> None:
    """A file larger than one CSV read block (1 MiB): ranges across block boundaries are exact."""
    n = 40_000
    expected = pa.table({"id": pa.array(range(n), pa.int64()), "text": ["x" * 40] * n})
    path = tmp_path / "big.csv"
    pacsv.write_csv(expected, path)
    assert path.stat().st_size > 1_500_000
    spec = InputSpec(uri=str(path))
    [frag] = list_fragments(spec)
    assert frag.num_rows == n
    got = read_range(spec, frag, 20_000, 30_000, columns=["id"])
    assert got.column("id").to_pylist() == list(range(20_000, 30_000))


def test_tsv_and_compressed_csv(tmp_path: Path) -> None:
    (tmp_path / "in.tsv").write_text("id\ttext\n1\ta, b\n2\tc\n")
    with gzip.open(tmp_path / "in.csv.gz", "wt") as f:
        f.write("id,text\n1,a\n2,b\n3,c\n")
    tsv = InputSpec(uri=str(tmp_path / "in.tsv"))
    assert read_table(tsv, columns=["text"]).column("text").to_pylist() == ["a, b", "c"]
    gz = InputSpec(uri=str(tmp_path / "in.csv.gz"), id_column="id")
    assert read_table(gz, columns=["text"]).column(ID).to_pylist() == ["1", "2", "3"]


# --- all formats -----------------------------------------------------------------------------------------


def _one_fragment(tmp_path: Path, fmt: str, table: pa.Table) -> tuple[InputSpec, Fragment]:
    if fmt == "parquet":
        path = tmp_path / "in.parquet"
        pq.write_table(table, path)
    elif fmt == "hf":
        path = _save_hf(tmp_path / "hf", table)
    elif fmt == "jsonl":
        path = _write_jsonl(tmp_path / "in.jsonl", table.to_pylist())
    else:
        path = tmp_path / "in.csv"
        pacsv.write_csv(table, path)
    spec = InputSpec(uri=str(path), format=fmt)  # type: ignore[arg-type]
    [frag] = list_fragments(spec)
    return spec, frag


@pytest.mark.parametrize("fmt", ["parquet", "hf", "jsonl", "csv"])
def test_every_format_reads_the_same_rows(tmp_path: Path, fmt: str) -> None:
    """The same table written in each format gives the same row count, rows, ids and schema names."""
    expected = _rows(9)
    spec, frag = _one_fragment(tmp_path, fmt, expected)
    assert frag.num_rows == 9 and frag.size > 0 and frag.row_bytes > 0
    for start, stop in [(0, 9), (2, 6), (8, 9)]:
        _check_range(spec, frag, expected, start, stop)
    assert input_schema(spec, frag).names == ["id", "text", "score"]
    with_id = dataclasses.replace(spec, id_column="id")
    assert read_range(with_id, frag, 3, 5, columns=["text"]).column(ID).to_pylist() == ["3", "4"]


def test_read_table_concatenates_files_and_honours_limit(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    pq.write_table(_rows(4), root / "a.parquet")
    pq.write_table(_rows(5, first=4), root / "b.parquet")
    spec = InputSpec(uri=str(root), format="parquet")
    assert read_table(spec, columns=["id"]).column("id").to_pylist() == list(range(9))
    limited = read_table(spec, columns=["id"], limit=6)
    assert limited.column("id").to_pylist() == list(range(6))
    assert limited.column(ID).to_pylist()[-2:] == ["b.parquet:0", "b.parquet:1"]


# --- memory:// and s3:// ---------------------------------------------------------------------------------


def test_memory_uris(tmp_path: Path) -> None:
    """An in-memory filesystem goes through the same listing and reading code."""
    fs = fsspec.filesystem("memory")
    root = f"/sw-{uuid.uuid4().hex[:8]}"
    for name, n in (("b.parquet", 3), ("a.parquet", 2)):
        with fs.open(f"{root}/pq/{name}", "wb") as f:
            pq.write_table(_rows(n), f)
    fs.pipe(f"{root}/j/in.jsonl", b'{"id": 1}\n\n{"id": 2}\nbroken\n')
    try:
        pq_spec = InputSpec(uri=f"memory://{root}/pq", format="parquet")
        frags = list_fragments(pq_spec)
        assert [(f.rel, f.num_rows) for f in frags] == [("a.parquet", 2), ("b.parquet", 3)]
        _check_range(pq_spec, frags[1], _rows(3), 1, 3)
        j_spec = InputSpec(uri=f"memory://{root}/j/in.jsonl")
        got = read_table(j_spec, columns=["id"])
        assert got.column("id").to_pylist() == [1, 2, None]
        assert [e is not None for e in got.column(READ_ERROR).to_pylist()] == [False, False, True]
    finally:
        fs.rm(root, recursive=True)


def _s3_put(opts: dict[str, Any], path: str, data: bytes) -> None:
    # A separate filesystem instance: what another process (or a person) writing the object would do.
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
    fs.pipe(path, data)


def _parquet_bytes(table: pa.Table, **kw: Any) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kw)
    return sink.getvalue().to_pybytes()


def test_s3_parquet_directory(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    _s3_put(
        s3_storage_options, f"{s3_bucket}/in/b.parquet", _parquet_bytes(_rows(6, first=4), row_group_size=2)
    )
    _s3_put(s3_storage_options, f"{s3_bucket}/in/a.parquet", _parquet_bytes(_rows(4)))
    _s3_put(s3_storage_options, f"{s3_bucket}/in/_SUCCESS", b"")
    spec = InputSpec(uri=f"s3://{s3_bucket}/in", format="parquet", storage_options=s3_storage_options)
    frags = list_fragments(spec)
    assert [(f.rel, f.num_rows) for f in frags] == [("a.parquet", 4), ("b.parquet", 6)]
    assert all(f.version for f in frags)  # the ETag
    _check_range(spec, frags[1], _rows(6, first=4), 1, 5)
    assert read_table(spec, columns=["id"]).column("id").to_pylist() == list(range(10))


def test_s3_jsonl_with_seeking(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    lines = [json.dumps({"id": i, "text": f"t{i}"}) for i in range(10)]
    lines[4] = "{broken"
    _s3_put(s3_storage_options, f"{s3_bucket}/j/rows.jsonl", ("\n".join(lines) + "\n").encode())
    spec = InputSpec(uri=f"s3://{s3_bucket}/j/*.jsonl", storage_options=s3_storage_options, shard_rows=3)
    [frag] = list_fragments(spec)
    assert (frag.rel, frag.num_rows, frag.offset_every) == ("rows.jsonl", 10, 3)
    got = read_range(spec, frag, 3, 8, columns=["id", "text"])
    assert got.column("id").to_pylist() == [3, None, 5, 6, 7]
    assert got.column(ID).to_pylist() == [f"rows.jsonl:{r}" for r in range(3, 8)]
    assert [e is not None for e in got.column(READ_ERROR).to_pylist()] == [False, True, False, False, False]


def test_s3_listing_sees_a_changed_file(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    """A file rewritten between two runs in one process is listed anew (new size/ETag → new fingerprint)."""
    path = f"{s3_bucket}/in/a.parquet"
    _s3_put(s3_storage_options, path, _parquet_bytes(_rows(4)))
    spec = InputSpec(uri=f"s3://{s3_bucket}/in", format="parquet", storage_options=s3_storage_options)
    [before] = list_fragments(spec)
    _s3_put(s3_storage_options, path, _parquet_bytes(_rows(7)))
    _s3_put(s3_storage_options, f"{s3_bucket}/in/b.parquet", _parquet_bytes(_rows(1)))
    after = list_fragments(spec)
    assert [(f.rel, f.num_rows) for f in after] == [("a.parquet", 7), ("b.parquet", 1)]
    assert (after[0].size, after[0].version) != (before.size, before.version)


def test_s3_missing_prefix(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    spec = InputSpec(uri=f"s3://{s3_bucket}/nothing/here.parquet", storage_options=s3_storage_options)
    with pytest.raises(SourceError, match="does not exist"):
        list_fragments(spec)
