"""Inputs: list an input's files (fragments) and read one shard of rows, for every format and fsspec URI.

Formats: `parquet` (file, directory, glob), `hf` (a `datasets` folder written by `save_to_disk`: Arrow
stream files listed in its state.json), `jsonl`, `csv`. Local paths, `file://`, `memory://`, `s3://` and
every other fsspec protocol go through the same code.

Rows are addressed by (file, row index within the file). The default row id is `<file>:<row>` with the
file relative to the input root, so it is stable across reruns and machines.

A row that cannot be parsed (a broken JSON line) is not an exception: it is returned with `__read_error`
set and becomes an error record downstream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import posixpath
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.block import ID, READ_ERROR, ROW
from pipeline.errors import SourceError, SpecError
from pipeline.spec import FORMATS, InputSpec, format_from_uri

__all__ = [
    "FileEntry",
    "Fragment",
    "content_hashes",
    "describe_files",
    "input_schema",
    "list_files",
    "list_fragments",
    "partition_values",
    "read_range",
    "read_shard",
    "read_table",
    "resolve_format",
]


# Rows per batch when a shard reads part of a large Parquet row group (bounds its decode memory).
_STREAM_BATCH_ROWS = 4096

_SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".json.gz", ".jsonl.bz2"),
    "csv": (".csv", ".csv.gz", ".csv.bz2", ".tsv"),
}


@dataclass(frozen=True)
class Fragment:
    """One input file and what the planner knows of it."""

    path: str  # as the filesystem names it (no protocol)
    rel: str  # relative to the input root: part of default row ids and of the fingerprint
    size: int
    version: str  # etag or mtime: a changed file changes the job fingerprint
    num_rows: int
    # Uncompressed bytes per row (estimate), to bound shard sizes.
    row_bytes: float
    # For jsonl: byte offset of every `offset_every`-th row, so shards seek instead of scanning.
    offsets: tuple[int, ...] = ()
    offset_every: int = 0
    # Index of offsets[0] among all anchors: a shard carries only the anchor it needs (see `for_rows`).
    offsets_base: int = 0
    # For parquet: rows of each row group, in file order (the planner cuts shards on these boundaries).
    row_groups: tuple[int, ...] = ()

    def for_rows(self, start: int) -> Fragment:
        """This fragment as a shard starting at row `start` needs it: one seek offset, not the whole list
        (a 10M-row file has ~10k anchors, which would otherwise travel with every shard), and no row-group
        list (the shard's reader finds its groups in the file's footer)."""
        frag = dataclasses.replace(self, row_groups=()) if self.row_groups else self
        if not frag.offsets or not frag.offset_every:
            return frag
        anchor = start // frag.offset_every
        return dataclasses.replace(
            frag, offsets=(frag.offsets[anchor - frag.offsets_base],), offsets_base=anchor
        )


def _fs(spec: InputSpec) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(spec.uri, **spec.storage_options)
    except (ImportError, ValueError) as e:
        raise SourceError(f"cannot open input.uri {spec.uri!r}: {e}") from e


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _is_hidden(path: str) -> bool:
    return any(part.startswith(("_", ".")) for part in path.split("/") if part)


def _list_paths(fs: Any, root: str, fmt: str) -> tuple[str, list[str]]:
    """(base dir for relative names, sorted data files) for a file, directory or glob."""
    if any(ch in root for ch in "*?["):
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
        base = re.split(r"[*?\[]", root, maxsplit=1)[0].rsplit("/", 1)[0]
        return base, paths
    if not fs.exists(root):
        raise SourceError(
            f"input.uri {root!r} does not exist; check the path (and storage_options for remote URIs)"
        )
    if fs.isfile(root):
        return posixpath.dirname(root), [root]
    if fmt == "hf":
        return root, _hf_files(fs, root)
    suffixes = _SUFFIXES[fmt]
    paths = sorted(
        p
        for p in fs.find(root)
        if not _is_hidden(posixpath.relpath(p, root))
        and (p.endswith(suffixes) or (fmt == "parquet" and "." not in posixpath.basename(p)))
    )
    return root, paths


def _hf_files(fs: Any, root: str) -> list[str]:
    if fs.exists(posixpath.join(root, "dataset_dict.json")):
        with fs.open(posixpath.join(root, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise SourceError(
            f"input.uri {root!r} is a DatasetDict with splits {splits}; point input.uri at one split, "
            f"e.g. {posixpath.join(root, splits[0]) if splits else root + '/<split>'}"
        )
    state = posixpath.join(root, "state.json")
    if not fs.exists(state):
        raise SourceError(
            f"input.uri {root!r} has no state.json; with format 'hf' it must be a folder written by Dataset.save_to_disk"
        )
    with fs.open(state) as f:
        files = [entry["filename"] for entry in json.load(f)["_data_files"]]
    return [posixpath.join(root, name) for name in files]


@dataclass(frozen=True)
class FileEntry:
    """A data file as a listing shows it (nothing read from it yet)."""

    path: str  # as the filesystem names it (no protocol)
    rel: str  # relative to the input root
    size: int
    version: str  # etag or mtime


def list_files(spec: InputSpec) -> list[FileEntry]:
    """Every data file of the input, in a deterministic order, from the listing alone (no file is opened)."""
    fs, root = _fs(spec)
    fmt = spec.resolved_format()
    # fsspec reuses one filesystem per process, and object stores cache listings in it: list anew, so that a
    # rerun in the same process sees files changed since (their ETag is part of the fingerprint).
    fs.invalidate_cache()
    try:
        base, paths = _list_paths(fs, root, fmt)
        entries = []
        for path in paths:
            info = fs.info(path)
            rel = posixpath.relpath(path, base) if base else path
            entries.append(FileEntry(path, rel, int(info.get("size") or 0), _version(info)))
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - backend errors (auth, network) reach the user with the URI
        raise SourceError(f"cannot list input.uri {spec.uri!r}: {type(e).__name__}: {e}") from e
    if not entries and not spec.allow_empty:
        raise SourceError(
            f"input.uri {spec.uri!r} matched no {fmt} files; check the path, the glob or input.format (or set "
            "input.allow_empty: true if an empty input is expected)"
        )
    return entries


def describe_files(spec: InputSpec, entries: Sequence[FileEntry]) -> list[Fragment]:
    """Open each listed file for what the planner needs: row counts (and row groups, JSONL offsets)."""
    fs, _ = _fs(spec)
    fmt = spec.resolved_format()
    fragments = []
    for entry in entries:
        try:
            info = {"size": entry.size, "mtime": entry.version}
            fragments.append(_describe(fs, entry.path, entry.rel, info, fmt, spec))
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"cannot read {fmt} file {entry.path!r}: {type(e).__name__}: {e}") from e
    return fragments


def list_fragments(spec: InputSpec) -> list[Fragment]:
    """Every data file of the input, in a deterministic order, with row counts."""
    return describe_files(spec, list_files(spec))


def partition_values(rel: str) -> dict[str, str]:
    """Hive-style partition folders in a file's relative path (`date=2026-12-01/part-0.parquet`) → columns."""
    out = {}
    for part in rel.split("/")[:-1]:
        key, sep, value = part.partition("=")
        if sep and key and not key.startswith(("_", ".")):
            out[key] = value
    return out


def _compression(path: str) -> str | None:
    return "gzip" if path.endswith(".gz") else "bz2" if path.endswith(".bz2") else None


def _describe(fs: Any, path: str, rel: str, info: dict[str, Any], fmt: str, spec: InputSpec) -> Fragment:
    size = int(info.get("size") or 0)
    version = _version(info)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        raw = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        return Fragment(
            path, rel, size, version, meta.num_rows, raw / max(meta.num_rows, 1), row_groups=groups
        )
    if fmt == "hf":
        import pyarrow.ipc as ipc

        rows = 0
        with fs.open(path, "rb") as f:
            reader = ipc.open_stream(f)
            for batch in reader:
                rows += batch.num_rows
        return Fragment(path, rel, size, version, rows, size / max(rows, 1))
    if fmt == "jsonl":
        every = max(1, min(spec.shard_rows, 1024))
        offsets: list[int] = []
        rows = 0
        with fs.open(path, "rb", compression=_compression(path)) as f:
            # A line over max_row_bytes is a row too (its error record comes from the worker's read).
            for pos, _, _ in _jsonl_lines(f, spec.max_row_bytes):
                if rows % every == 0:
                    offsets.append(pos)
                rows += 1
        return Fragment(path, rel, size, version, rows, size / max(rows, 1), tuple(offsets), every)
    if fmt == "csv":
        rows = 0
        for batch in _csv_batches(fs, path, None):
            rows += batch.num_rows
        return Fragment(path, rel, size, version, rows, size / max(rows, 1))
    raise SourceError(f"unknown input.format {fmt!r}")


def _csv_batches(fs: Any, path: str, columns: Sequence[str] | None) -> Any:
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(delimiter="\t" if path.endswith(".tsv") else ",")
    convert = pacsv.ConvertOptions(include_columns=list(columns) if columns else None)
    with fs.open(path, "rb", compression=_compression(path)) as f:
        reader = pacsv.open_csv(f, parse_options=parse, convert_options=convert)
        yield from reader


def input_schema(spec: InputSpec, fragment: Fragment) -> pa.Schema:
    """Schema of one fragment (for checking that the job's columns exist before any work starts)."""
    fs, _ = _fs(spec)
    fmt = spec.resolved_format()
    extra = [pa.field(k, pa.string()) for k in partition_values(fragment.rel)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(fragment.path, "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
    elif fmt == "hf":
        import pyarrow.ipc as ipc

        with fs.open(fragment.path, "rb") as f:
            schema = ipc.open_stream(f).schema
    else:
        table = read_range(spec, fragment, 0, min(fragment.num_rows, 100), columns=None)
        return pa.schema([f for f in table.schema if not f.name.startswith("__")])
    return pa.schema(list(schema) + [f for f in extra if f.name not in schema.names])


def _slice_batches(batches: Any, start: int, stop: int) -> list[pa.RecordBatch]:
    out, pos = [], 0
    for batch in batches:
        end = pos + batch.num_rows
        if end > start and pos < stop:
            out.append(batch.slice(max(start - pos, 0), min(stop, end) - max(start, pos)))
        pos = end
        if pos >= stop:
            break
    return out


def _concat(batches: list[pa.RecordBatch], schema: pa.Schema | None) -> pa.Table:
    if batches:
        return pa.Table.from_batches(batches)
    return (schema or pa.schema([])).empty_table()


def read_range(
    spec: InputSpec, fragment: Fragment, start: int, stop: int, *, columns: Sequence[str] | None
) -> pa.Table:
    """Rows [start, stop) of one file, only `columns` (None: all), plus `__id`, `__row`, `__read_error`.

    `__row` is the row index within the file. Missing columns raise SourceError naming them.
    """
    fs, _ = _fs(spec)
    fmt = spec.resolved_format()
    partitions = partition_values(fragment.rel)
    wanted = list(dict.fromkeys(columns)) if columns is not None else None
    cols = [c for c in wanted if c not in partitions] if wanted is not None else None
    # Ids come from the id column even when the caller did not ask for it (it is dropped again below).
    extra_id = None
    if cols is not None and spec.id_column is not None and spec.id_column not in cols:
        extra_id = spec.id_column
        cols.append(extra_id)
    errors: list[str | None] | None = None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(fragment.path, "rb") as f:
            pf = pq.ParquetFile(f)
            _check_columns(pf.schema_arrow.names, cols, fragment)
            groups: list[int] = []
            first = pos = last = 0  # the file rows where the first read group starts and the last one ends
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if pos + n > start and pos < stop:
                    first = pos if not groups else first
                    groups.append(i)
                    last = pos + n
                pos += n
            schema = pf.schema_arrow if cols is None else pa.schema([pf.schema_arrow.field(c) for c in cols])
            if not groups:
                table = schema.empty_table()
            elif first == start and last == stop:
                table = pf.read_row_groups(groups, columns=cols)  # planned on group boundaries: no waste
            else:
                # A shard inside a row group larger than a shard: stream the group in small batches and keep
                # only this shard's rows, so memory stays at the shard's size, not the group's.
                batches = pf.iter_batches(batch_size=_STREAM_BATCH_ROWS, row_groups=groups, columns=cols)
                table = _concat(_slice_batches(batches, start - first, stop - first), schema)
    elif fmt == "hf":
        import pyarrow.ipc as ipc

        with fs.open(fragment.path, "rb") as f:
            reader = ipc.open_stream(f)
            _check_columns(reader.schema.names, cols, fragment)
            table = _concat(_slice_batches(reader, start, stop), reader.schema)
        if cols is not None:
            table = table.select(cols)
    elif fmt == "csv":
        batches = _slice_batches(_csv_batches(fs, fragment.path, None), start, stop)
        table = _concat(batches, None)
        _check_columns(table.column_names, cols, fragment)
        if cols is not None:
            table = table.select(cols)
    elif fmt == "jsonl":
        table, errors = _read_jsonl(fs, fragment, start, stop, cols, max_row_bytes=spec.max_row_bytes)
    else:
        raise SourceError(f"unknown input.format {fmt!r}")
    table, errors = _bound_rows(table, errors, spec, start)
    n = table.num_rows
    rows = pa.array(range(start, start + n), pa.int64())
    if spec.id_column is not None:
        _check_columns(table.column_names, [spec.id_column], fragment)
        # A row whose id is missing (e.g. a broken JSON line) still needs an id for its error record.
        values = table.column(spec.id_column).to_pylist()
        ids = pa.array(
            [f"{fragment.rel}:{start + i}" if v is None else str(v) for i, v in enumerate(values)],
            pa.string(),
        )
    else:
        ids = pa.array([f"{fragment.rel}:{r}" for r in range(start, start + n)], pa.string())
    if extra_id is not None:
        table = table.drop_columns([extra_id])
    for key, value in partitions.items():
        if key not in table.column_names and (wanted is None or key in wanted):
            table = table.append_column(key, pa.array([value] * n, pa.string()))
    table = table.append_column(ID, ids).append_column(ROW, rows)
    return table.append_column(
        READ_ERROR, pa.array(errors if errors is not None else [None] * n, pa.string())
    )


def _bound_rows(
    table: pa.Table, errors: list[str | None] | None, spec: InputSpec, start: int
) -> tuple[pa.Table, list[str | None] | None]:
    """Rows whose text/binary cells hold more than input.max_row_bytes become read errors, and those cells
    become null, so an oversized cell goes no further than the read (its error record keeps the row's id)."""
    if table.num_rows == 0:
        return table, errors
    import numpy as np
    import pyarrow.compute as pc

    sizes = np.zeros(table.num_rows, dtype=np.int64)  # (rows,)
    for column in table.columns:
        sizes += np.concatenate([_cell_bytes(chunk) for chunk in column.chunks])
    big = sizes > spec.max_row_bytes
    if not big.any():
        return table, errors
    errors = list(errors) if errors is not None else [None] * table.num_rows
    for i in np.flatnonzero(big):
        if errors[i] is None:
            errors[i] = (
                f"row {start + int(i)} has {int(sizes[i])} bytes of text/binary cells, more than "
                f"input.max_row_bytes ({spec.max_row_bytes} bytes); raise input.max_row_bytes or fix the file"
            )
    mask = pa.array(big)
    for name in table.column_names:
        if name != spec.id_column:
            column = table.column(name)
            nulled = pc.if_else(mask, pa.nulls(table.num_rows, column.type), column)
            table = table.set_column(table.schema.get_field_index(name), name, nulled)
    return table, errors


def _cell_bytes(array: pa.Array) -> Any:
    """Bytes of text/binary data in each cell of `array` (nested lists and structs summed; other types 0):
    (len(array),) int64."""
    import numpy as np
    import pyarrow.compute as pc

    t = array.type
    if (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    ):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_struct(t):
        out = np.zeros(len(array), dtype=np.int64)
        for child in array.flatten():
            out += _cell_bytes(child)
        return out
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        # Offsets index the whole child array (`values` ignores a slice of the parent; offsets do not).
        totals = np.concatenate([[0], np.cumsum(_cell_bytes(array.values))])
        offsets = array.offsets.to_numpy()
        return totals[offsets[1:]] - totals[offsets[:-1]]
    return np.zeros(len(array), dtype=np.int64)


def read_shard(
    spec: InputSpec, fragment: Fragment, start: int, stop: int, *, columns: Sequence[str] | None
) -> pa.Table:
    """`read_range` for a planned shard: the file must still be the one the plan saw (size and mtime/etag)
    and give exactly the planned rows, or the shard fails with a SourceError naming the file (its rows would
    otherwise be silently lost, duplicated or mixed with another version's)."""
    fs, _ = _fs(spec)
    try:
        info = fs.info(fragment.path)
    except FileNotFoundError:
        raise SourceError(
            f"input file {fragment.rel!r} was deleted after the job was planned; restore it, or rerun the "
            "job to plan the input as it is now (with --overwrite if the output must match the new input)"
        ) from None
    size, version = int(info.get("size") or 0), _version(info)
    if size != fragment.size or version != fragment.version:
        raise SourceError(
            f"input file {fragment.rel!r} changed after the job was planned (size {fragment.size} → {size}, "
            f"version {fragment.version!r} → {version!r}); its rows cannot be read as planned. Rerun the job "
            "to plan the new content (the changed input changes the job fingerprint: --overwrite recomputes)"
        )
    table = read_range(spec, fragment, start, stop, columns=columns)
    if table.num_rows != stop - start:
        raise SourceError(
            f"input file {fragment.rel!r} gave {table.num_rows} rows for rows [{start}, {stop}) where the plan "
            f"counted {stop - start}; the file changed while the job ran. Rerun the job to plan it anew"
        )
    return table


def resolve_format(spec: InputSpec) -> InputSpec:
    """`spec` with `format` set: from the key, the URI's suffix, or else the files in the folder it names
    (a folder of `*.parquet` files is parquet; a `datasets` folder with state.json is hf)."""
    if spec.format is not None:
        return spec
    try:
        return dataclasses.replace(spec, format=format_from_uri(spec.uri))  # type: ignore[arg-type]
    except SpecError:
        pass
    fs, root = _fs(spec)
    try:
        is_dir = fs.isdir(root)
    except Exception as e:  # noqa: BLE001 - backend errors (auth, network) reach the user with the URI
        raise SourceError(f"cannot open input.uri {spec.uri!r}: {type(e).__name__}: {e}") from e
    if not is_dir:
        if not fs.exists(root):
            raise SourceError(
                f"input.uri {spec.uri!r} does not exist; check the path (and storage_options for remote URIs)"
            )
        raise SpecError(
            "input.format",
            f"cannot tell the format of {spec.uri!r} from its name; set input.format to one of {list(FORMATS)}",
        )
    if fs.exists(posixpath.join(root, "state.json")) or fs.exists(posixpath.join(root, "dataset_dict.json")):
        return dataclasses.replace(spec, format="hf")
    found: dict[str, int] = {}
    for path in fs.find(root):
        if _is_hidden(posixpath.relpath(path, root)):
            continue
        for fmt, suffixes in _SUFFIXES.items():
            if path.endswith(suffixes):
                found[fmt] = found.get(fmt, 0) + 1
    if len(found) == 1:
        return dataclasses.replace(spec, format=next(iter(found)))  # type: ignore[arg-type]
    what = ", ".join(f"{n} {fmt}" for fmt, n in sorted(found.items())) or "no data files"
    raise SpecError(
        "input.format",
        f"input.uri {spec.uri!r} is a folder with {what}; set input.format to one of {list(FORMATS)}"
        + (" (the other files are skipped)" if found else ""),
    )


def content_hashes(spec: InputSpec, fragments: Sequence[Fragment]) -> dict[str, str]:
    """sha256 of every input file (`--verify-input`): catches files edited in place with the same size and
    mtime, which the listing (size, mtime/etag) cannot see. Reads the whole input once, in parallel."""
    fs, _ = _fs(spec)

    def digest(fragment: Fragment) -> str:
        h = hashlib.sha256()
        with fs.open(fragment.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip([f.rel for f in fragments], pool.map(digest, fragments), strict=True))


def _check_columns(names: Sequence[str], wanted: Sequence[str] | None, fragment: Fragment) -> None:
    if wanted is None:
        return
    missing = [c for c in wanted if c not in names]
    if missing:
        raise SourceError(
            f"column(s) {missing} not found in {fragment.rel!r}; its columns: {list(names)}. Fix the stage's "
            "`inputs`, input.id_column or input.keep_columns"
        )


# A line longer than max_row_bytes is skipped in reads of this size. 1 MiB keeps a skip cheap (a few dozen
# reads for a 50 MB line) and the memory it holds small.
_LINE_BLOCK = 1 << 20
_NON_SPACE = re.compile(rb"\S")


def _jsonl_lines(f: Any, max_row_bytes: int, *, offset: int = 0) -> Any:
    """(file offset, line, size in bytes) for each non-blank line of a binary file.

    `line` is None for a line over `max_row_bytes` (its newline not counted): it is read in blocks that are
    dropped as they come, so no more than `max_row_bytes` of one line is ever held. fsspec's remote files
    have no `readline(limit)`; a BufferedReader over them (or over a local or compressed file) has, in C.
    """
    reader = io.BufferedReader(f, buffer_size=_LINE_BLOCK)  # type: ignore[arg-type]
    while line := reader.readline(max_row_bytes + 1):  # + 1: the newline
        size = len(line)
        if size > max_row_bytes and not line.endswith(b"\n"):  # over the limit: skip to its end
            blank = _NON_SPACE.search(line) is None
            line = b""  # drop it before reading on
            while part := reader.readline(_LINE_BLOCK):
                size += len(part)
                blank = blank and _NON_SPACE.search(part) is None
                if part.endswith(b"\n"):
                    break
            if not blank:
                yield offset, None, size - 1 if part.endswith(b"\n") else size
        elif _NON_SPACE.search(line) is not None:  # (not strip(): no copy of a long line)
            yield offset, line, size
        offset += size


def _read_jsonl(
    fs: Any, fragment: Fragment, start: int, stop: int, cols: list[str] | None, *, max_row_bytes: int
) -> tuple[pa.Table, list[str | None]]:
    """Parse rows line by line so that one broken (or over-long) line is one error row, not a failed shard."""
    anchor = start // fragment.offset_every if fragment.offset_every else 0
    compression = _compression(fragment.path)
    records: list[dict[str, Any]] = []
    errors: list[str | None] = []
    with fs.open(fragment.path, "rb", compression=compression) as f:
        row, offset = 0, 0
        if fragment.offsets and compression is None:
            offset = fragment.offsets[anchor - fragment.offsets_base]
            f.seek(offset)
            row = anchor * fragment.offset_every
        for _, line, size in _jsonl_lines(f, max_row_bytes, offset=offset):
            if row >= stop:
                break
            if row >= start and line is None:
                records.append({})
                errors.append(
                    f"row {row} (blank lines not counted) is {size} bytes, more than input.max_row_bytes "
                    f"({max_row_bytes} bytes); raise input.max_row_bytes or fix the file"
                )
            elif row >= start:
                try:
                    value = json.loads(line)
                    if not isinstance(value, dict):
                        raise ValueError(f"a JSON line must hold an object, got {type(value).__name__}")
                    records.append(value)
                    errors.append(None)
                except ValueError as e:
                    records.append({})
                    errors.append(f"row {row} (blank lines not counted): {e}")
            row += 1
    if cols is None:
        cols = list(dict.fromkeys(k for r in records for k in r))
    elif any(e is None for e in errors):
        # A column no parsed line has is a spec mistake, not a bad row (one row missing a key is a bad row).
        present = set().union(*(r.keys() for r, e in zip(records, errors, strict=True) if e is None))
        _check_columns(sorted(present), cols, fragment)
    data = {}
    for c in cols:
        values = [r.get(c) for r in records]
        try:
            data[c] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            # Mixed types across rows (e.g. text and numbers): the rows whose value is not of the most common
            # type are bad rows (an error record each), not a reason to fail the shard or to coerce silently.
            _drop_odd_values(c, values, errors, type)
            try:
                data[c] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                # One Python type with different insides ({"k": 1} and {"k": "a"}, ints beyond int64): the same
                # rule on the Arrow type of each value.
                _drop_odd_values(c, values, errors, _arrow_type)
                data[c] = pa.array(values)
    return pa.table(data) if data else pa.table({"__empty": pa.nulls(len(records))}).drop(["__empty"]), errors


def _arrow_type(value: Any) -> pa.DataType | None:
    try:
        return pa.array([value]).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return None  # Arrow cannot hold it at all


def _drop_odd_values(column: str, values: list[Any], errors: list[str | None], kind: Any) -> None:
    """Null out the values whose kind is not the most common one and make their rows bad rows.

    Ties go to the kind seen first, so a retried shard makes the same rows bad (not a set's order).
    """
    kinds = [None if v is None else kind(v) for v in values]
    known = [k for k in kinds if k is not None]
    common = max(dict.fromkeys(known), key=known.count) if known else None

    def name(k: Any) -> str:
        return "value Arrow cannot store" if k is None else getattr(k, "__name__", str(k))

    for i, v in enumerate(values):
        if v is not None and (kinds[i] is None or kinds[i] != common):
            if errors[i] is None:
                errors[i] = f"column {column!r} holds a {name(kinds[i])} here; other rows hold {name(common)}"
            values[i] = None


def read_table(
    spec: InputSpec, *, columns: Sequence[str] | None = None, limit: int | None = None
) -> pa.Table:
    """All rows of an input (e.g. a training set), concatenated; `limit` stops early."""
    parts, total = [], 0
    for fragment in list_fragments(spec):
        stop = fragment.num_rows if limit is None else min(fragment.num_rows, limit - total)
        if stop <= 0:
            break
        parts.append(read_range(spec, fragment, 0, stop, columns=columns))
        total += stop
    return pa.concat_tables(parts, promote_options="permissive")
