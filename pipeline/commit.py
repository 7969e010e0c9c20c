"""Exactly-once output: atomic shard files, commit records, the manifest, `_SUCCESS`, resume.

Layout of an output directory (local path or any fsspec URI):

    part-<shard>.parquet          predictions of one shard (id, kept columns, task fields)
    _errors/part-<shard>.parquet  one record per bad row: id, stage, error_type, message (only if any)
    _shards/<shard>.json          commit record: rows_in/ok/error, bytes, sha256, run id
    _manifest.json                job fingerprint, spec, state, counts, committed shards, runs
    _SUCCESS                      written last, only when every shard is committed and the error rate is ok

Names starting with "_" are skipped by Parquet readers (pyarrow, pandas, Spark), so reading the output
directory reads just the predictions.

A shard is committed when its commit record exists: the record is written after the part files, each by
one atomic operation (temp name + rename on local disks, a single PUT on object stores). A retried task
rewrites the same names with the same content; a shard with a record is never recomputed on resume.
The driver is the only writer of `_manifest.json`; commit records are the source of truth it rebuilds from.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import FingerprintMismatch, OutputError

__all__ = ["ERROR_SCHEMA", "OutputDir", "ShardRecord", "read_errors", "read_output"]

ERROR_SCHEMA = pa.schema(
    [("id", pa.string()), ("stage", pa.string()), ("error_type", pa.string()), ("message", pa.string())]
)
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
SHARDS = "_shards"
ERRORS = "_errors"


@dataclass(frozen=True)
class ShardRecord:
    shard_id: str
    run_id: str
    rows_in: int
    rows_ok: int
    rows_error: int
    bytes: int
    sha256: str
    committed_at: float


class OutputDir:
    """One job's output location. Picklable (only the URI and options), so workers can commit."""

    def __init__(
        self, uri: str, *, storage_options: dict[str, Any] | None = None, compression: str = "zstd"
    ) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.compression = compression
        self._fs_root: tuple[Any, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "storage_options": self.storage_options, "compression": self.compression}

    def __setstate__(self, state: dict[str, Any]) -> None:
        OutputDir.__init__(
            self, state["uri"], storage_options=state["storage_options"], compression=state["compression"]
        )

    # -- filesystem ------------------------------------------------------------------------------------
    @property
    def fs(self) -> Any:
        return self._resolve()[0]

    @property
    def root(self) -> str:
        return self._resolve()[1]

    def _resolve(self) -> tuple[Any, str]:
        if self._fs_root is None:
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
            self._fs_root = (fs, root.rstrip("/"))
        return self._fs_root

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _is_local(self) -> bool:
        protocol = self.fs.protocol
        return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: readers see the old file or the whole new one, never a partial file."""
        path = self.path(rel)
        if self._is_local():
            import os

            os.makedirs(posixpath.dirname(path), exist_ok=True)
            # A leading "." hides a temp file that a killed task leaves behind from Parquet readers of the output.
            tmp = posixpath.join(
                posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}"
            )
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)  # one PUT: object stores make it visible whole or not at all

    def _fresh(self, path: str) -> str:
        """`path`, with the filesystem's cached listings of it dropped: workers in other processes write here,
        and object-store filesystems (s3fs, gcsfs) keep listings per process, so a cached one can miss shards."""
        self.fs.invalidate_cache(path)
        return path

    def read_json(self, rel: str) -> Any | None:
        try:
            with self.fs.open(self._fresh(self.path(rel)), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def exists(self, rel: str = "") -> bool:
        return bool(self.fs.exists(self._fresh(self.path(rel) if rel else self.root)))

    def _listdir(self, rel: str) -> list[str]:
        try:
            return [
                posixpath.basename(p.rstrip("/"))
                for p in self.fs.ls(self._fresh(self.path(rel)), detail=False)
            ]
        except FileNotFoundError:
            return []

    def has_content(self) -> bool:
        return bool(self._listdir("")) if self.exists() else False

    # -- driver side -----------------------------------------------------------------------------------
    def prepare(
        self,
        *,
        fingerprint: str,
        parts: dict[str, Any],
        mode: Literal["resume", "overwrite", "error-if-exists"],
    ) -> dict[str, ShardRecord]:
        """Check the output against the job and return the shards already committed (resume)."""
        if mode == "error-if-exists" and self.has_content():
            raise OutputError(
                f"output.uri {self.uri!r} already has content and output.mode is 'error-if-exists'; choose another "
                "output.uri, or set output.mode to 'resume' (continue this job) or 'overwrite' (start again)"
            )
        if mode == "overwrite":
            if self.exists():
                self.fs.rm(self.root, recursive=True)
            return {}
        manifest = self.read_json(MANIFEST)
        if manifest is None:
            if self._listdir(SHARDS):
                raise OutputError(
                    f"output.uri {self.uri!r} holds commit records but no {MANIFEST}; it was not written by a "
                    "complete shardwise start. Use --overwrite to start again or choose another output.uri"
                )
            if any(name.endswith(".parquet") for name in self._listdir("")):
                raise OutputError(
                    f"output.uri {self.uri!r} already holds Parquet files not written by shardwise; choose an "
                    "empty output.uri or use --overwrite to replace them"
                )
            return {}
        if manifest.get("fingerprint") != fingerprint:
            before = manifest.get("fingerprint_parts") or {}
            changed = (
                ", ".join(
                    k
                    for k in parts
                    if json.dumps(before.get(k), sort_keys=True, default=str)
                    != json.dumps(parts[k], sort_keys=True, default=str)
                )
                or "job"
            )
            raise FingerprintMismatch(
                f"output.uri {self.uri!r} holds results of a different job (fingerprint "
                f"{str(manifest.get('fingerprint'))[:12]}… vs this job's {fingerprint[:12]}…: the {changed} "
                "changed). Mixing them would give inconsistent predictions. Rerun with --overwrite (or "
                "output.mode: overwrite) to recompute everything, or write to another output.uri"
            )
        return self.committed()

    def committed(self) -> dict[str, ShardRecord]:
        """Commit records whose part file exists (a record is written only after its part file)."""
        records = {}
        parts = {name for name in self._listdir("") if name.startswith("part-")}
        for name in self._listdir(SHARDS):
            if not name.endswith(".json"):
                continue
            data = self.read_json(posixpath.join(SHARDS, name))
            if data is None:
                continue
            rec = ShardRecord(**data)
            if f"part-{rec.shard_id}.parquet" in parts:
                records[rec.shard_id] = rec
        return records

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_bytes(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True, default=str).encode())

    def write_success(self) -> None:
        self.write_bytes(SUCCESS, b"")

    def clear_success(self) -> None:
        if self.exists(SUCCESS):
            self.fs.rm(self.path(SUCCESS))

    # -- worker side -----------------------------------------------------------------------------------
    def commit_shard(
        self, shard_id: str, *, run_id: str, predictions: pa.Table, errors: pa.Table
    ) -> ShardRecord:
        """Write one shard's files, then its commit record. Safe to repeat (same names, same content)."""
        data = _parquet_bytes(predictions, self.compression)
        self.write_bytes(f"part-{shard_id}.parquet", data)
        if errors.num_rows:
            self.write_bytes(
                posixpath.join(ERRORS, f"part-{shard_id}.parquet"), _parquet_bytes(errors, self.compression)
            )
        record = ShardRecord(
            shard_id=shard_id,
            run_id=run_id,
            rows_in=predictions.num_rows + errors.num_rows,
            rows_ok=predictions.num_rows,
            rows_error=errors.num_rows,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            committed_at=time.time(),
        )
        self.write_bytes(posixpath.join(SHARDS, f"{shard_id}.json"), json.dumps(record.__dict__).encode())
        return record


def _parquet_bytes(table: pa.Table, compression: str) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=None if compression == "none" else compression)
    return buf.getvalue()


def _read_parts(out: OutputDir, rel: str, shard_ids: Iterable[str] | None) -> pa.Table | None:
    names = sorted(n for n in out._listdir(rel) if n.startswith("part-") and n.endswith(".parquet"))
    if shard_ids is not None:
        wanted = {f"part-{s}.parquet" for s in shard_ids}
        names = [n for n in names if n in wanted]
    tables = []
    for name in names:
        with out.fs.open(out.path(rel, name) if rel else out.path(name), "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def read_output(uri: str, *, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """All predictions of a job, in shard order (a convenience; any Parquet reader works too)."""
    out = OutputDir(uri, storage_options=storage_options)
    table = _read_parts(out, "", None)
    if table is None:
        raise OutputError(f"{uri!r} holds no part files")
    return table


def read_errors(uri: str, *, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """All error records of a job (empty table with ERROR_SCHEMA when there are none)."""
    table = _read_parts(OutputDir(uri, storage_options=storage_options), ERRORS, None)
    return table if table is not None else ERROR_SCHEMA.empty_table()
