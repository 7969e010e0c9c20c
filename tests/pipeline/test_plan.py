"""pipeline.plan: shards cover every row exactly once with deterministic ids; the fingerprint changes exactly
when the predictions could."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.bind import bind
from pipeline.plan import Shard, fingerprint, plan_shards
from pipeline.sources import Fragment, list_fragments
from pipeline.spec import JobSpec, parse_spec

MODEL = {"model": "/models/tiny", "revision": None, "weights": {"model.safetensors": "abc123"}}


def _spec(**input_keys: Any) -> JobSpec:
    return parse_spec(
        {
            "name": "job",
            "input": {"uri": "data/in.parquet", **input_keys},
            "stages": [
                {
                    "name": "s",
                    "task": "text-classification",
                    "model": "/models/tiny",
                    "inputs": {"text": "text"},
                    "params": {"top_k": 1},
                }
            ],
            "output": {"uri": "out"},
        }
    )


def _frag(
    rel: str, num_rows: int, *, row_bytes: float = 10.0, size: int = 1000, version: str = "v1"
) -> Fragment:
    return Fragment(
        path=f"/data/{rel}", rel=rel, size=size, version=version, num_rows=num_rows, row_bytes=row_bytes
    )


def _check_cover(shards: list[Shard], fragments: list[Fragment]) -> None:
    """Every row of every fragment is in exactly one shard, shards in listing then row order."""
    for frag in fragments:
        ranges = [(s.start, s.stop) for s in shards if s.fragment.rel == frag.rel]
        if frag.num_rows == 0:
            assert ranges == []
            continue
        assert ranges[0][0] == 0 and ranges[-1][1] == frag.num_rows
        for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False):
            assert stop == start  # no gap, no overlap
        assert all(stop > start for start, stop in ranges)
    assert sum(s.num_rows for s in shards) == sum(f.num_rows for f in fragments)
    order = [[f.rel for f in fragments].index(s.fragment.rel) for s in shards]
    assert order == sorted(order)


# --- shards ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_rows", "shard_rows"),
    [(n, r) for n in (1, 2, 7, 100, 4095, 4096, 4097, 10_001) for r in (1, 3, 64, 4096) if n // r <= 2000],
)
def test_shards_cover_every_row_once_within_shard_rows(num_rows: int, shard_rows: int) -> None:
    frags = [_frag("a", num_rows), _frag("b", 5)]
    shards = plan_shards(_spec(shard_rows=shard_rows), frags)
    _check_cover(shards, frags)
    assert max(s.num_rows for s in shards) <= shard_rows
    # Equal-sized shards within a file: no runt shard that leaves a replica idle.
    sizes = [s.num_rows for s in shards if s.fragment.rel == "a"]
    assert max(sizes) - min(sizes) <= 1
    assert len(sizes) == -(-num_rows // shard_rows)  # as few shards as shard_rows allows


@pytest.mark.parametrize(
    ("row_bytes", "shard_bytes"),
    [(1.0, 1000), (100.0, 1000), (100.0, 150), (0.2, 50), (5000.0, 1000), (3.0, 64 << 20)],
)
def test_shard_bytes_bound(row_bytes: float, shard_bytes: int) -> None:
    """A shard holds about shard_bytes at most; a row bigger than the bound is a shard of its own."""
    frags = [_frag("a", 1000, row_bytes=row_bytes)]
    shards = plan_shards(_spec(shard_rows=4096, shard_bytes=shard_bytes), frags)
    _check_cover(shards, frags)
    for shard in shards:
        assert shard.num_rows * row_bytes <= shard_bytes or shard.num_rows == 1


def test_empty_files_give_no_shard_and_ids_stay_consecutive() -> None:
    frags = [_frag("a", 0), _frag("b", 3), _frag("c", 0), _frag("d", 2)]
    shards = plan_shards(_spec(shard_rows=2), frags)
    _check_cover(shards, frags)
    assert [(s.shard_id, s.fragment.rel, s.start, s.stop) for s in shards] == [
        ("00000", "b", 0, 1),
        ("00001", "b", 1, 3),
        ("00002", "d", 0, 2),
    ]
    assert plan_shards(_spec(), [_frag("a", 0)]) == []


def test_ids_are_deterministic_zero_padded_and_sort_in_plan_order() -> None:
    frags = [_frag(f"f{i}", n) for i, n in enumerate([5, 17, 1, 30])]
    spec = _spec(shard_rows=4)
    shards = plan_shards(spec, frags)
    ids = [s.shard_id for s in shards]
    assert ids == [f"{i:05d}" for i in range(len(shards))]
    assert sorted(ids) == ids  # part-<id>.parquet files list in plan order
    again = plan_shards(spec, [dataclasses.replace(f) for f in frags])
    assert again == shards


def test_id_width_grows_past_99999_shards() -> None:
    shards = plan_shards(_spec(shard_rows=1), [_frag("a", 100_001)])
    assert shards[0].shard_id == "000000" and shards[-1].shard_id == "100000"
    assert len({len(s.shard_id) for s in shards}) == 1


def test_shard_dict_round_trip() -> None:
    """Shards travel to Ray tasks as plain dicts (JSON-able) and come back equal."""
    frag = Fragment("/d/a.jsonl", "a.jsonl", 10, "v", 7, 1.5, offsets=(0, 40), offset_every=4)
    shard = plan_shards(_spec(shard_rows=4), [frag])[1]
    assert Shard.from_dict(json.loads(json.dumps(shard.to_dict()))) == shard


def test_shards_over_real_files(tmp_path: Path) -> None:
    """Planned over list_fragments: row counts come from the files and bounds hold on real row sizes."""
    root = tmp_path / "ds"
    root.mkdir()
    for name, n in (("a.parquet", 250), ("b.parquet", 0), ("c.parquet", 33)):
        pq.write_table(pa.table({"id": list(range(n)), "text": ["word " * 20] * n}, schema=None), root / name)
    spec = _spec(uri=str(root), format="parquet", shard_rows=100, shard_bytes=5_000)
    frags = list_fragments(spec.input)
    shards = plan_shards(spec, frags)
    _check_cover(shards, frags)
    for shard in shards:
        assert shard.num_rows * shard.fragment.row_bytes <= 5_000


# --- fingerprint -----------------------------------------------------------------------------------------


def _fp(spec: JobSpec, frags: list[Fragment], model: dict[str, Any] = MODEL) -> str:
    return fingerprint(bind(spec), frags, model_identities={s.name: model for s in spec.stages})[0]


FRAGS = [_frag("a.parquet", 10), _frag("b.parquet", 20)]


def _with_stage(spec: JobSpec, **changes: Any) -> JobSpec:
    return dataclasses.replace(spec, stages=(dataclasses.replace(spec.stage, **changes),))


def _with_input(spec: JobSpec, **changes: Any) -> JobSpec:
    return dataclasses.replace(spec, input=dataclasses.replace(spec.input, **changes))


def test_fingerprint_is_deterministic_and_names_its_parts() -> None:
    digest, parts = fingerprint(bind(_spec()), FRAGS, model_identities={"s": MODEL})
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest == _fp(_spec(), list(FRAGS))
    assert json.loads(json.dumps(parts)) == parts  # stored in the manifest
    assert parts["input"]["files"] == [["a.parquet", 1000, "v1", 10], ["b.parquet", 1000, "v1", 20]]
    stage = parts["stages"][_spec().stage.name]
    assert stage["task"] == "text-classification" and stage["model"] == MODEL


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda: [dataclasses.replace(FRAGS[0], size=1001), FRAGS[1]], id="file size"),
        pytest.param(lambda: [dataclasses.replace(FRAGS[0], version="v2"), FRAGS[1]], id="file version"),
        pytest.param(lambda: [dataclasses.replace(FRAGS[0], num_rows=11), FRAGS[1]], id="row count"),
        pytest.param(lambda: [dataclasses.replace(FRAGS[0], rel="z.parquet"), FRAGS[1]], id="file name"),
        pytest.param(lambda: FRAGS[:1], id="file removed"),
        pytest.param(lambda: [*FRAGS, _frag("c.parquet", 1)], id="file added"),
    ],
)
def test_fingerprint_changes_with_the_input_files(change: Any) -> None:
    assert _fp(_spec(), change()) != _fp(_spec(), FRAGS)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: _with_stage(s, params={"top_k": 2}), id="params"),
        pytest.param(
            lambda s: _with_stage(s, params={"top_k": 1, "function_to_apply": "sigmoid"}), id="params added"
        ),
        # Another task with its own (default) params: what the params parse to differs with the task.
        pytest.param(lambda s: _with_stage(s, task="token-classification", params={}), id="task"),
        pytest.param(lambda s: _with_stage(s, inputs={"text": "title"}), id="inputs"),
        pytest.param(lambda s: _with_stage(s, dtype="bfloat16"), id="dtype"),
        # The stage's name is in its error records (and names its column in a multi-stage job).
        pytest.param(lambda s: _with_stage(s, name="renamed"), id="stage name"),
        pytest.param(lambda s: _with_stage(s, output=False), id="output"),
        pytest.param(lambda s: _with_input(s, id_column="id"), id="id column"),
        pytest.param(lambda s: _with_input(s, keep_columns=("text",)), id="kept columns"),
        pytest.param(lambda s: _with_input(s, shard_rows=100), id="shard rows"),
        pytest.param(lambda s: _with_input(s, shard_bytes=1 << 20), id="shard bytes"),
        pytest.param(lambda s: _with_input(s, format="jsonl"), id="format"),
    ],
)
def test_fingerprint_changes_with_what_is_predicted(change: Any) -> None:
    assert _fp(change(_spec()), FRAGS) != _fp(_spec(), FRAGS)


@pytest.mark.parametrize(
    "model",
    [
        {**MODEL, "revision": "v2"},
        {**MODEL, "weights": {"model.safetensors": "def456"}},
        {**MODEL, "model": "/models/other"},
    ],
    ids=["revision", "weights", "path"],
)
def test_fingerprint_changes_with_the_model_identity(model: dict[str, Any]) -> None:
    assert _fp(_spec(), FRAGS, model) != _fp(_spec(), FRAGS)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: _with_stage(s, batch_size=7), id="batch size"),
        pytest.param(lambda s: _with_stage(s, replicas=(1, 8)), id="replicas"),
        pytest.param(lambda s: _with_stage(s, num_gpus=0.5), id="num gpus"),
        pytest.param(lambda s: _with_stage(s, num_cpus=4.0), id="num cpus"),
        pytest.param(lambda s: _with_stage(s, max_batch_tokens=2048), id="max batch tokens"),
        pytest.param(
            lambda s: dataclasses.replace(s, name="other", max_error_rate=0.5), id="job name, error rate"
        ),
        pytest.param(
            lambda s: dataclasses.replace(s, output=dataclasses.replace(s.output, mode="overwrite")),
            id="output mode",
        ),
    ],
)
def test_fingerprint_ignores_speed_knobs(change: Any) -> None:
    """Resuming with more replicas or another batch size keeps the committed shards."""
    assert _fp(change(_spec()), FRAGS) == _fp(_spec(), FRAGS)


def test_fingerprint_ignores_params_key_order() -> None:
    a = _with_stage(_spec(), params={"top_k": 2, "function_to_apply": "softmax"})
    b = _with_stage(_spec(), params={"function_to_apply": "softmax", "top_k": 2})
    assert _fp(a, FRAGS) == _fp(b, FRAGS)


def test_fingerprint_follows_real_file_changes(tmp_path: Path) -> None:
    """Rewriting or touching an input file changes the fingerprint; an untouched listing does not."""
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    spec = _spec(uri=str(path))
    before = _fp(spec, list_fragments(spec.input))
    assert _fp(spec, list_fragments(spec.input)) == before

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    touched = _fp(spec, list_fragments(spec.input))
    assert touched != before

    pq.write_table(pa.table({"text": ["a", "b", "c"]}), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # same mtime as `touched`
    assert _fp(spec, list_fragments(spec.input)) not in {before, touched}
