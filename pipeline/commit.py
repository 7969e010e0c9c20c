"""Exactly-once output: atomic shard files, verified commit records, the manifest, `_SUCCESS`, resume.

Layout of an output directory (local path or any fsspec URI):

    part-<shard>.parquet          predictions of one shard (id, kept columns, task fields)
    _errors/part-<shard>.parquet  one record per bad row: id, input_file, input_row, stage, step, error_type,
                                  message
    _shards/<shard>.json          commit record: fingerprint, rows_in/ok/error, size and sha256 of the parts
    _shards/seg-<run>-<n>.parquet commit records compacted by the driver (every 10,000 shards and at the end)
    _manifest.json                job fingerprint, spec (secrets redacted), state, counts, runs — constant size
    _lease.json                   the run that writes here now (pipeline.lease)
    _SUCCESS                      written last, once every planned shard's record was checked against its part

Names starting with "_" are skipped by Parquet readers (pyarrow, pandas, Spark), so reading the output
directory reads just the predictions.

A shard is committed when its commit record exists and matches its part: the record is written after the
part files, each by one atomic operation (temp name + rename on local disks, a single PUT on object stores),
and carries the part's size and sha256 and the job fingerprint. Resume trusts a record only when the part
it describes is there with that size (and, with `verify`, that hash) under this job's fingerprint; any
other shard is computed again. A retried task rewrites the same names with the same content.

Ownership: shardwise writes only into a missing or empty folder or one that holds its manifest (of the same
kind of job), and deletes (`overwrite`) only its own names in a folder that holds its manifest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import CorruptOutput, FingerprintMismatch, OutputError

__all__ = [
    "ERRORS",
    "ERROR_SCHEMA",
    "OUTPUT_FORMAT",
    "READ_STAGE",
    "SUCCESS",
    "Ledger",
    "OutputDir",
    "ShardRecord",
    "error_schema",
    "parquet_bytes",
    "read_errors",
    "read_output",
]

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
SHARDS = "_shards"
ERRORS = "_errors"
LEASE = "_lease.json"
# Version of the output layout; a manifest of another format is not resumed.
# 3: error records name the stage and the step; commit records count errors per stage; multi-stage jobs.
OUTPUT_FORMAT = 3
# The key of read errors (a row that failed before any stage) in a commit record's `errors_by_stage`.
READ_STAGE = "(read)"
# The driver folds this many commit records into one Parquet segment: resume reads a few segments instead
# of a million small JSON files, and no file grows with the job.
COMPACT_EVERY = 10_000
# Parallel reads of commit records and parts (object stores answer slowly one request at a time).
_IO_THREADS = 16

# What shardwise writes in an inference output and may delete there (`overwrite`); anything else is not ours.
# `_metrics` holds what `shardwise evaluate` wrote beside the predictions (jobs/evaluate.py).
_OWN_INFERENCE = ("part-*.parquet", ERRORS, SHARDS, MANIFEST, SUCCESS, LEASE, "_runs", "_metrics", ".*.tmp-*")
# ... in a fine-tune output, besides the model files its manifest lists.
_OWN_FINETUNE = (MANIFEST, SUCCESS, LEASE, "_checkpoints", ".staging-*", ".*.tmp-*", "train_metrics.json")


def error_schema(id_field: pa.Field | None = None) -> pa.Schema:
    """Error records: the row's id under the input id column's name and type (joins back to the input;
    `id` as text when the input has no id column), where the row is in the input, and what went wrong: the
    stage (its name; null when the row could not be read), the step (read, preprocess, forward,
    postprocess), the error type and message."""
    return pa.schema(
        [
            id_field if id_field is not None else pa.field("id", pa.string()),
            ("input_file", pa.string()),
            ("input_row", pa.int64()),
            ("stage", pa.string()),
            ("step", pa.string()),
            ("error_type", pa.string()),
            ("message", pa.string()),
        ]
    )


ERROR_SCHEMA = error_schema()


@dataclass(frozen=True)
class ShardRecord:
    shard_id: str
    run_id: str
    fingerprint: str
    rows_in: int
    rows_ok: int
    rows_error: int
    bytes: int
    sha256: str
    errors_bytes: int
    errors_sha256: str
    committed_at: float
    # JSON object: error rows per stage name (READ_STAGE for rows that could not be read).
    errors_by_stage: str = "{}"

    def stage_errors(self) -> dict[str, int]:
        return json.loads(self.errors_by_stage or "{}")

    @staticmethod
    def from_dict(data: Any, *, where: str) -> ShardRecord:
        names = {f.name: f.type for f in fields(ShardRecord)}
        if isinstance(data, dict) and "errors_by_stage" not in data:
            data = {**data, "errors_by_stage": "{}"}
        if not isinstance(data, dict) or set(data) != set(names):
            raise CorruptOutput(
                f"commit record {where} is not a shardwise commit record; delete it to compute that shard "
                "again, or rerun with --overwrite"
            )
        casts: dict[str, Any] = {"str": str, "float": float, "int": int}
        try:
            values: dict[str, Any] = {k: casts[str(names[k])](v) for k, v in data.items()}
            return ShardRecord(**values)
        except (TypeError, ValueError) as e:
            raise CorruptOutput(
                f"commit record {where} has a bad value ({e}); delete it to compute that shard again, or "
                "rerun with --overwrite"
            ) from e


def changed_parts(before: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fingerprint parts that differ, as deep as a mapping goes: `stages.summarize.model`
    says which stage changed and what of it."""
    if isinstance(before, dict) and isinstance(now, dict) and prefix.count(".") < 2:
        out: list[str] = []
        for key in list(now) + [k for k in before if k not in now]:
            out += changed_parts(before.get(key), now.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    same = json.dumps(before, sort_keys=True, default=str) == json.dumps(now, sort_keys=True, default=str)
    return [] if same else [prefix or "job"]


class OutputDir:
    """One job's output location. Picklable (only the URI and options), so workers can commit."""

    def __init__(
        self, uri: str, *, storage_options: dict[str, Any] | None = None, compression: str = "zstd"
    ) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.compression = compression
        self._fs_root: tuple[Any, str] | None = None
        self.single_records: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "storage_options": self.storage_options, "compression": self.compression}

    def __setstate__(self, state: dict[str, Any]) -> None:
        OutputDir.__init__(
            self, state["uri"], storage_options=state["storage_options"], compression=state["compression"]
        )

    def __repr__(self) -> str:  # never the storage options: they may hold credentials
        return f"OutputDir({self.uri!r})"

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

    def _is_s3(self) -> bool:
        protocol = self.fs.protocol
        return bool({"s3", "s3a"} & set(protocol if isinstance(protocol, tuple) else (protocol,)))

    def _local_tmp(self, path: str, data: bytes) -> str:
        """`data` written and synced to a hidden temp file beside `path` (then renamed or linked into place)."""
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        # A leading "." hides a temp file that a killed task leaves behind from Parquet readers of the output.
        tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: readers see the old file or the whole new one, never a partial file."""
        path = self.path(rel)
        if self._is_local():
            os.replace(self._local_tmp(path, data), path)
        else:
            self.fs.pipe_file(path, data)  # one PUT: object stores make it visible whole or not at all

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if it does not exist, atomically where the filesystem allows; False if it exists."""
        path = self.path(rel)
        if self._is_local():
            tmp = self._local_tmp(path, data)
            try:
                os.link(tmp, path)  # fails if the name exists; the content is complete when it appears
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self._is_s3():
            try:
                self.fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
                return True
            except Exception:  # noqa: BLE001 - 412 Precondition Failed surfaces as various errors
                if self.exists(rel):
                    return False
                raise
        if self.exists(rel):  # no atomic create on this filesystem: check, then write (see pipeline.lease)
            return False
        self.fs.pipe_file(path, data)
        return True

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm(self.path(rel))
        except FileNotFoundError:
            pass

    def _fresh(self, path: str) -> str:
        """`path`, with the filesystem's cached listings of it dropped: workers in other processes write here,
        and object-store filesystems (s3fs, gcsfs) keep listings per process, so a cached one can miss shards."""
        self.fs.invalidate_cache(path)
        return path

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self._fresh(self.path(rel)), "rb") as f:
            return bytes(f.read())

    def mtime(self, rel: str) -> float | None:
        try:
            info = self.fs.info(self._fresh(self.path(rel)))
        except FileNotFoundError:
            return None
        value = info.get("mtime") or info.get("LastModified") or info.get("created")
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        return float(value) if value is not None else None

    def read_json(self, rel: str) -> Any | None:
        """The JSON in `rel`, None if it is absent; CorruptOutput naming the file if it cannot be parsed."""
        try:
            raw = self.read_bytes(rel)
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise CorruptOutput(
                f"{self.uri}/{rel} is not valid JSON ({e}); it was damaged after shardwise wrote it. "
                + (
                    "Delete it to compute that shard again, or rerun with --overwrite"
                    if rel.startswith(SHARDS)
                    else "Rerun with --overwrite to start the job again (its parts cannot be trusted without it), "
                    "or write to another output.uri"
                )
            ) from e

    def exists(self, rel: str = "") -> bool:
        return bool(self.fs.exists(self._fresh(self.path(rel) if rel else self.root)))

    def _listdir(self, rel: str) -> list[str]:
        return list(self.sizes(rel))

    def sizes(self, rel: str = "") -> dict[str, int]:
        """Names directly in `rel` → size in bytes (folders too, with size 0). One listing call."""
        try:
            entries = self.fs.ls(self._fresh(self.path(rel) if rel else self.root), detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            name = posixpath.basename(str(entry["name"]).rstrip("/"))
            out[name] = int(entry.get("size") or 0) if entry.get("type") != "directory" else 0
        return out

    def has_content(self) -> bool:
        return bool(self._listdir("")) if self.exists() else False

    # -- ownership ---------------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        manifest = self.read_json(MANIFEST)
        if manifest is not None and (not isinstance(manifest, dict) or "kind" not in manifest):
            raise CorruptOutput(
                f"{self.uri}/{MANIFEST} is not a shardwise manifest; this folder was not written by shardwise "
                "(or the file was replaced). Choose another output.uri"
            )
        return manifest

    def foreign_names(self, kind: str, manifest: dict[str, Any] | None) -> list[str]:
        """Entries of the folder that shardwise did not write (for a job of `kind`)."""
        own = _OWN_INFERENCE if kind == "inference" else _OWN_FINETUNE
        listed = set((manifest or {}).get("files") or ())
        return sorted(
            n
            for n in self._listdir("")
            if n not in listed and not any(fnmatch.fnmatchcase(n, pat) for pat in own)
        )

    def claim(
        self, *, kind: Literal["inference", "finetune"], mode: str, delete: bool = True
    ) -> dict[str, Any] | None:
        """Check that this job may write here; with mode `overwrite`, delete shardwise's files. Returns the
        manifest of an earlier run of this output (None when there is none, or after an overwrite).

        The caller holds the lease (`delete=False` checks without deleting, e.g. before taking it). Nothing
        that shardwise did not write is ever deleted or written over."""
        manifest = self.read_manifest()
        if manifest is not None and manifest.get("kind") != kind:
            other = manifest.get("kind")
            what = "a fine-tuned model" if other == "finetune" else f"the predictions of a {other} job"
            raise OutputError(
                f"output.uri {self.uri!r} holds {what} ({manifest.get('name')!r}); a {kind} job may not write "
                "into it or delete it (not even with --overwrite). Choose another output.uri"
            )
        foreign = self.foreign_names(kind, manifest)
        if foreign:
            raise OutputError(
                f"output.uri {self.uri!r} holds files shardwise did not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); it writes only into a new or empty folder or one it "
                "wrote, and never deletes what is not its own. Choose another output.uri"
            )
        if manifest is None:
            # A lease (and its hidden temp file) is there while another run starts: not a reason to refuse.
            if [n for n in self._listdir("") if n != LEASE and not fnmatch.fnmatchcase(n, ".*.tmp-*")]:
                raise OutputError(
                    f"output.uri {self.uri!r} holds shardwise files but no {MANIFEST} (it was removed, or the "
                    "folder was copied in part); it cannot be resumed or safely overwritten. Delete the folder "
                    "yourself or choose another output.uri"
                )
            return None
        if mode == "error-if-exists":
            raise OutputError(
                f"output.uri {self.uri!r} already holds a {kind} output and output.mode is 'error-if-exists'; "
                "choose another output.uri, or set output.mode to 'resume' (continue that job) or 'overwrite' "
                "(start again)"
            )
        if mode == "overwrite" and delete:
            self.delete_own(kind, manifest)
            return None
        return manifest

    def delete_own(self, kind: str, manifest: dict[str, Any]) -> None:
        """Delete shardwise's names in this folder (never the lease: the caller holds it)."""
        own = _OWN_INFERENCE if kind == "inference" else _OWN_FINETUNE
        listed = set(manifest.get("files") or ())
        doomed = [
            n
            for n in self._listdir("")
            if n != LEASE and n != MANIFEST and (n in listed or any(fnmatch.fnmatchcase(n, p) for p in own))
        ]
        for name in doomed:
            self.fs.rm(self.path(name), recursive=True)
        self.remove(MANIFEST)  # last: until it is gone, a crash mid-delete leaves a folder we still own

    # -- driver side -----------------------------------------------------------------------------------
    def prepare(
        self,
        *,
        fingerprint: str,
        parts: dict[str, Any],
        mode: Literal["resume", "overwrite", "error-if-exists"],
        verify: bool = False,
        notes: list[str] | None = None,
    ) -> dict[str, ShardRecord]:
        """Check the output against the job and return the shards already committed and intact (resume).

        A shard whose record does not match its part (missing, other size, other hash with `verify`, another
        fingerprint) is left out, so it is computed again; `notes` gets one line saying how many and why."""
        manifest = self.claim(kind="inference", mode=mode)
        if manifest is None:
            return {}
        if manifest.get("format") != OUTPUT_FORMAT or manifest.get("fingerprint") != fingerprint:
            changed = ", ".join(changed_parts(manifest.get("fingerprint_parts") or {}, parts)[:4]) or "job"
            if manifest.get("format") != OUTPUT_FORMAT:
                changed = f"output format ({manifest.get('format')} → {OUTPUT_FORMAT})"
            raise FingerprintMismatch(
                f"output.uri {self.uri!r} holds results of a different job (fingerprint "
                f"{str(manifest.get('fingerprint'))[:12]}… vs this job's {fingerprint[:12]}…: the {changed} "
                "changed). Mixing them would give inconsistent predictions. Rerun with --overwrite (or "
                "output.mode: overwrite) to recompute everything, or write to another output.uri"
            )
        good, bad = self.verified(self.read_records(), fingerprint=fingerprint, verify=verify)
        if bad and notes is not None:
            reasons = sorted(bad.items())
            notes.append(
                f"{len(bad)} committed shard(s) do not match their part files and will be computed again: "
                + "; ".join(f"{k}: {why}" for k, why in reasons[:3])
                + (" ..." if len(bad) > 3 else "")
            )
        return good

    def read_records(self) -> dict[str, ShardRecord]:
        """Every commit record: compacted segments and single JSON files (the newest wins), read in parallel."""
        names = self._listdir(SHARDS)
        segments = sorted(n for n in names if n.startswith("seg-") and n.endswith(".parquet"))
        singles = sorted(n for n in names if n.endswith(".json"))
        records: dict[str, ShardRecord] = {}
        from_singles: set[str] = set()

        def read_segment(name: str) -> list[ShardRecord]:
            where = f"{self.uri}/{SHARDS}/{name}"
            try:
                rows = pq.read_table(io.BytesIO(self.read_bytes(posixpath.join(SHARDS, name)))).to_pylist()
            except (pa.ArrowInvalid, OSError) as e:
                if isinstance(e, FileNotFoundError):
                    return []
                raise CorruptOutput(
                    f"commit record segment {where} cannot be read ({e}); delete it to compute its shards "
                    "again, or rerun with --overwrite"
                ) from e
            return [ShardRecord.from_dict(r, where=where) for r in rows]

        def read_single(name: str) -> list[ShardRecord]:
            data = self.read_json(posixpath.join(SHARDS, name))
            return [] if data is None else [ShardRecord.from_dict(data, where=f"{self.uri}/{SHARDS}/{name}")]

        with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
            seg_batches = list(pool.map(read_segment, segments))
            single_batches = list(pool.map(read_single, singles))
        for batch, single in [(b, False) for b in seg_batches] + [(b, True) for b in single_batches]:
            for rec in batch:
                old = records.get(rec.shard_id)
                if old is None or rec.committed_at >= old.committed_at:
                    records[rec.shard_id] = rec
                if single:
                    from_singles.add(rec.shard_id)
        # Shards whose newest record is a single JSON file: the driver compacts these at the end of a run.
        self.single_records = {k for k in from_singles if k in records}
        return records

    def verified(
        self, records: dict[str, ShardRecord], *, fingerprint: str | None, verify: bool = False
    ) -> tuple[dict[str, ShardRecord], dict[str, str]]:
        """(records that match their parts, {shard: why not} for the others). One listing of the folder and
        of `_errors/` gives the sizes; `verify` also reads every part and compares its sha256."""
        parts = self.sizes("")
        error_parts = self.sizes(ERRORS)
        good: dict[str, ShardRecord] = {}
        bad: dict[str, str] = {}
        for sid, rec in records.items():
            name = f"part-{sid}.parquet"
            if fingerprint is not None and rec.fingerprint != fingerprint:
                bad[sid] = "committed by another job (fingerprint differs)"
            elif name not in parts:
                bad[sid] = f"{name} is missing"
            elif parts[name] != rec.bytes:
                bad[sid] = f"{name} has {parts[name]} bytes, its record says {rec.bytes}"
            elif rec.rows_error and error_parts.get(name) != rec.errors_bytes:
                bad[sid] = f"{ERRORS}/{name} is missing or has another size than its record says"
            else:
                good[sid] = rec
        if verify and good:

            def check(rec: ShardRecord) -> str | None:
                name = f"part-{rec.shard_id}.parquet"
                if hashlib.sha256(self.read_bytes(name)).hexdigest() != rec.sha256:
                    return f"{name} does not have the sha256 its record says"
                if rec.rows_error and (
                    hashlib.sha256(self.read_bytes(posixpath.join(ERRORS, name))).hexdigest()
                    != rec.errors_sha256
                ):
                    return f"{ERRORS}/{name} does not have the sha256 its record says"
                return None

            with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
                for rec, why in zip(list(good.values()), pool.map(check, list(good.values())), strict=True):
                    if why is not None:
                        bad[rec.shard_id] = why
                        del good[rec.shard_id]
        return good, bad

    def committed(self, *, fingerprint: str | None = None, verify: bool = False) -> dict[str, ShardRecord]:
        """Commit records that match their part files (a record is written only after its part files)."""
        return self.verified(self.read_records(), fingerprint=fingerprint, verify=verify)[0]

    def compact(self, records: Sequence[ShardRecord], *, tag: str) -> None:
        """Fold single commit records into one Parquet segment (atomically), then delete the singles."""
        if not records:
            return
        table = pa.table({f.name: [getattr(r, f.name) for r in records] for f in fields(ShardRecord)})
        self.write_bytes(posixpath.join(SHARDS, f"seg-{tag}.parquet"), parquet_bytes(table, "zstd"))
        prefix = self.path(SHARDS) + "/"
        paths = [f"{prefix}{r.shard_id}.json" for r in records]
        if self._is_local():
            for path in paths:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
        else:
            try:
                self.fs.rm(paths)
            except FileNotFoundError:
                pass

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_bytes(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True, default=str).encode())

    def write_success(self) -> None:
        self.write_bytes(SUCCESS, b"")

    def clear_success(self) -> None:
        self.remove(SUCCESS)

    def publish_folder(
        self, fill: Callable[[str], None], *, listed: Callable[[list[str]], None]
    ) -> list[str]:
        """Put a folder of files (a model) into the output so that readers never see a partial file; returns
        the files' names relative to the output. Clears `_SUCCESS` first: the caller writes it last.

        `fill(stage)` writes the files into a staging folder: a hidden one inside the output on a local disk
        (each file is then one rename), a local temp folder for object stores (then one PUT per file).
        `listed(files)` is called with their names before the first one appears (the caller's manifest lists
        them, so a crash mid-publish leaves only files that an overwrite knows it may delete)."""
        self.clear_success()
        local = self._is_local()
        if local:
            self.fs.makedirs(self.root, exist_ok=True)
        stage = (
            self.path(f".staging-{uuid.uuid4().hex[:8]}") if local else tempfile.mkdtemp(prefix="shardwise-")
        )
        try:
            if local:
                os.makedirs(stage)
            fill(stage)
            files = sorted(p.relative_to(stage).as_posix() for p in Path(stage).rglob("*") if p.is_file())
            listed(files)
            for rel in files:
                if local:
                    os.makedirs(posixpath.dirname(self.path(rel)), exist_ok=True)
                    os.replace(posixpath.join(stage, rel), self.path(rel))
                else:
                    self.fs.put_file(posixpath.join(stage, rel), self.path(rel))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return files

    # -- worker side -----------------------------------------------------------------------------------
    def commit_shard(
        self,
        shard_id: str,
        *,
        run_id: str,
        fingerprint: str,
        predictions: pa.Table,
        errors: pa.Table,
        errors_by_stage: dict[str, int] | None = None,
    ) -> ShardRecord:
        """Write one shard's files, then its commit record. Safe to repeat (same names, same content)."""
        data = parquet_bytes(predictions, self.compression)
        self.write_bytes(f"part-{shard_id}.parquet", data)
        err_data = b""
        if errors.num_rows:
            err_data = parquet_bytes(errors, self.compression)
            self.write_bytes(posixpath.join(ERRORS, f"part-{shard_id}.parquet"), err_data)
        record = ShardRecord(
            shard_id=shard_id,
            run_id=run_id,
            fingerprint=fingerprint,
            rows_in=predictions.num_rows + errors.num_rows,
            rows_ok=predictions.num_rows,
            rows_error=errors.num_rows,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            errors_bytes=len(err_data),
            errors_sha256=hashlib.sha256(err_data).hexdigest() if err_data else "",
            committed_at=time.time(),
            errors_by_stage=json.dumps(errors_by_stage or {}, sort_keys=True),
        )
        self.write_bytes(posixpath.join(SHARDS, f"{shard_id}.json"), json.dumps(asdict(record)).encode())
        return record


class Ledger:
    """The driver's running account of a run's commits: constant work per record (counters, a set of done
    shards, a batch waiting to be compacted), so a job's driver cost is linear in its shards."""

    def __init__(
        self,
        out: OutputDir,
        *,
        run_id: str,
        previous: dict[str, ShardRecord],
        compact_every: int = COMPACT_EVERY,
    ) -> None:
        self.out = out
        self.run_id = run_id
        self.compact_every = compact_every
        self.done: set[str] = set(previous)
        self.rows_in = sum(r.rows_in for r in previous.values())
        self.rows_error = sum(r.rows_error for r in previous.values())
        self.stage_errors: Counter[str] = Counter()
        for r in previous.values():
            self.stage_errors.update(r.stage_errors())
        self.run_rows = 0
        self._pending: list[ShardRecord] = []
        self._segments = 0

    @property
    def rows_ok(self) -> int:
        return self.rows_in - self.rows_error

    def add(self, rec: ShardRecord) -> bool:
        """Count a commit record; False for a shard already counted (a retried task's second commit)."""
        if rec.shard_id in self.done:
            return False
        self.done.add(rec.shard_id)
        self.rows_in += rec.rows_in
        self.rows_error += rec.rows_error
        self.stage_errors.update(rec.stage_errors())
        self.run_rows += rec.rows_in
        self._pending.append(rec)
        if len(self._pending) >= self.compact_every:
            self.flush()
        return True

    def flush(self) -> None:
        """Compact the records counted since the last flush."""
        if self._pending:
            self.out.compact(self._pending, tag=f"{self.run_id}-{self._segments:05d}")
            self._segments += 1
            self._pending = []


def parquet_bytes(table: pa.Table, compression: str) -> bytes:
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


def read_output(uri: str, *, storage_options: dict[str, Any] | None = None, flat: bool = False) -> pa.Table:
    """All predictions of a job, in shard order (a convenience; any Parquet reader works too).

    A multi-stage job writes one struct column per stage; `flat=True` gives them as `<stage>.<field>`
    columns (`Table.flatten`), e.g. `summarize.summary_text`, `sentiment.label`."""
    out = OutputDir(uri, storage_options=storage_options)
    table = _read_parts(out, "", None)
    if table is None:
        raise OutputError(f"{uri!r} holds no part files")
    return table.flatten() if flat else table


def read_errors(uri: str, *, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """All error records of a job (an empty table with ERROR_SCHEMA when there are none)."""
    table = _read_parts(OutputDir(uri, storage_options=storage_options), ERRORS, None)
    return table if table is not None else ERROR_SCHEMA.empty_table()
