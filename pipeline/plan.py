"""Plan: the input's fragments cut into deterministic shards, and the job fingerprint.

A shard is a row range of one file, at most `input.shard_rows` rows and about `input.shard_bytes` bytes.
The same input listing and spec always give the same shards with the same ids, which is what lets a
rerun skip committed shards and lets a retried task overwrite its own part file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.redact import fingerprint_view, options_digest
from pipeline.sources import Fragment
from pipeline.spec import JobSpec, spec_to_dict

if TYPE_CHECKING:
    from pipeline.bind import BoundJob

__all__ = ["PLAN_VERSION", "Shard", "file_key", "fingerprint", "plan_shards"]

# 2: Parquet shards follow row groups; input.limit.
PLAN_VERSION = 2


@dataclass(frozen=True)
class Shard:
    shard_id: str  # zero-padded position in the plan: names part-<shard_id>.parquet
    fragment: Fragment
    start: int  # first row within the file
    stop: int  # one past the last row

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "fragment": asdict(self.fragment),
            "start": self.start,
            "stop": self.stop,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Shard:
        frag = dict(d["fragment"])
        frag["offsets"] = tuple(frag.get("offsets") or ())
        frag["row_groups"] = tuple(frag.get("row_groups") or ())
        return Shard(d["shard_id"], Fragment(**frag), int(d["start"]), int(d["stop"]))


def plan_shards(spec: JobSpec, fragments: list[Fragment], *, notes: list[str] | None = None) -> list[Shard]:
    """Row-range shards over all fragments, in listing order. Empty files give no shard.

    Parquet shards follow row-group boundaries (whole groups, several small ones per shard), so a shard
    decodes only its own rows. A group larger than a shard is cut into row ranges that are streamed; when it
    is much larger, reading it costs more than the shard (`notes` gets a message on how to rewrite the file).
    `input.limit` keeps the first rows of the plan only.
    """
    ranges: list[tuple[Fragment, int, int]] = []
    big_groups: list[tuple[str, int, int]] = []  # (file, largest row group, rows per shard)
    for frag in fragments:
        if frag.num_rows == 0:
            continue
        by_bytes = max(1, int(spec.input.shard_bytes // max(frag.row_bytes, 1.0)))
        per_shard = min(spec.input.shard_rows, by_bytes)
        if frag.row_groups and sum(frag.row_groups) == frag.num_rows:
            ranges.extend(_group_ranges(frag, per_shard, big_groups))
        else:
            ranges.extend((frag, a, b) for a, b in _equal_pieces(0, frag.num_rows, per_shard))
    if big_groups and notes is not None:
        rel, biggest, per_shard = max(big_groups, key=lambda g: g[1])
        which = f"{rel!r}" if len(big_groups) == 1 else f"{len(big_groups)} files (e.g. {rel!r})"
        notes.append(
            f"{which} {'has' if len(big_groups) == 1 else 'have'} row groups of up to {biggest:,} rows, "
            f"{biggest // per_shard}× a shard ({per_shard:,} rows): each shard streams through its group, so "
            "reading costs more than it should. Rewrite with smaller row groups, e.g. "
            f"pyarrow.parquet.write_table(table, path, row_group_size={per_shard})"
        )
    if spec.input.limit is not None:
        ranges = _first_rows(ranges, spec.input.limit)
    if spec.output.mode == "incremental":
        # Ids that do not move when files are added: <file key>-<n-th shard of the file>.
        counts: dict[str, int] = {}
        shards = []
        for frag, start, stop in ranges:
            n = counts.get(frag.rel, 0)
            counts[frag.rel] = n + 1
            shards.append(Shard(f"{file_key(frag.rel)}-{n:05d}", frag.for_rows(start), start, stop))
        return shards
    width = max(5, len(str(len(ranges))))
    return [
        Shard(str(i).zfill(width), frag.for_rows(start), start, stop)
        for i, (frag, start, stop) in enumerate(ranges)
    ]


def file_key(rel: str) -> str:
    """A short stable name for an input file (its path relative to the input root)."""
    return hashlib.sha256(rel.encode()).hexdigest()[:12]


def _equal_pieces(start: int, stop: int, per_shard: int) -> list[tuple[int, int]]:
    """Equal-sized pieces (rather than full ones plus a runt) balance the replicas: sizes differ by at most
    one row, and none exceeds per_shard."""
    n = stop - start
    pieces = math.ceil(n / per_shard)
    return [(start + i * n // pieces, start + (i + 1) * n // pieces) for i in range(pieces)]


# A row group this many times larger than a shard is read over and over by the shards cut from it.
_BIG_GROUP_FACTOR = 4


def _group_ranges(
    frag: Fragment, per_shard: int, big_groups: list[tuple[str, int, int]]
) -> list[tuple[Fragment, int, int]]:
    out: list[tuple[Fragment, int, int]] = []
    start = pos = 0
    biggest = 0
    for rows in frag.row_groups:
        if rows > per_shard:
            if pos > start:
                out.append((frag, start, pos))
            out.extend((frag, a, b) for a, b in _equal_pieces(pos, pos + rows, per_shard))
            biggest = max(biggest, rows)
            start = pos = pos + rows
            continue
        if pos + rows - start > per_shard:
            out.append((frag, start, pos))
            start = pos
        pos += rows
    if pos > start:
        out.append((frag, start, pos))
    if biggest > _BIG_GROUP_FACTOR * per_shard:
        big_groups.append((frag.rel, biggest, per_shard))
    return out


def _first_rows(ranges: list[tuple[Fragment, int, int]], limit: int) -> list[tuple[Fragment, int, int]]:
    out, total = [], 0
    for frag, a, b in ranges:
        if total >= limit:
            break
        b = min(b, a + limit - total)
        out.append((frag, a, b))
        total += b - a
    return out


def fingerprint(
    job: BoundJob,
    fragments: list[Fragment],
    *,
    model_identities: dict[str, dict[str, Any]],
    with_files: bool = True,
) -> tuple[str, dict[str, Any]]:
    """(sha256 hex, the parts it hashes). Anything that changes which rows exist or what is predicted for
    them is in — for every stage of the job — while knobs that only change speed (batch_size, replicas,
    num_gpus) are out. `model_identities` holds each stage's model identity by stage name.

    `with_files=False` leaves the input listing out: what is computed, not over which files (incremental
    jobs keep their files in the manifest and add new ones run by run)."""
    spec = job.spec
    parts = {
        "shardwise": __version__,
        # Bump when the shard boundaries for the same input change: committed shards of an older plan
        # must not be mixed with new ones.
        "plan": PLAN_VERSION,
        "input": {
            "format": spec.input.resolved_format(),
            "id_column": spec.input.id_column,
            "keep_columns": spec.input.kept_as(),
            "shard_rows": spec.input.shard_rows,
            "shard_bytes": spec.input.shard_bytes,
            "limit": spec.input.limit,
            "max_row_bytes": spec.input.max_row_bytes,  # decides which rows become errors
            # Non-secret storage options only (endpoint, region): a rotated key is the same job.
            "storage": options_digest(spec.input.storage_options),
            "files": [[f.rel, f.size, f.version, f.num_rows] for f in fragments],
        },
        # By name, so a mismatch names the stage that changed (`stages.summarize.params`).
        "stages": {
            s.name: {
                "order": s.index,
                "task": s.task_name,
                "inputs": {name: src.source for name, src in s.inputs},
                # Parsed: `{}` and `{top_k: 1}` (the default) are the same job.
                "params": fingerprint_view(spec_to_dict(s.params)),
                "dtype": s.dtype,
                "model": model_identities[s.name],
                "output": s.write,
            }
            for s in job.stages
        },
    }
    if not with_files:
        del parts["input"]["files"]  # type: ignore[attr-defined]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return digest, parts
