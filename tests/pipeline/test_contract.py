"""The output contract without Ray: safe locations, the lease, verified commit records, compaction and the
driver's per-shard cost, row-group planning, and what `status` makes of an output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.commit import ERROR_SCHEMA, OUTPUT_FORMAT, Ledger, OutputDir, ShardRecord
from pipeline.errors import CorruptOutput, OutputError, OutputLocked, SpecError
from pipeline.lease import LEASE, Lease, read_lease
from pipeline.locations import check_output_location
from pipeline.plan import plan_shards
from pipeline.sources import list_fragments
from pipeline.spec import parse_spec
from pipeline.status import output_status

FP = "f" * 64


def _preds(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": list(range(start, start + n)), "label": ["x"] * n})


def _commit(out: OutputDir, sid: str, n: int, *, fp: str = FP, run_id: str = "r1", errors: int = 0):
    errs = pa.table(
        {
            "id": [f"e{i}" for i in range(errors)],
            "input_file": ["in"] * errors,
            "input_row": list(range(errors)),
            "stage": [None] * errors,
            "step": ["read"] * errors,
            "error_type": ["X"] * errors,
            "message": ["m"] * errors,
        },
        schema=ERROR_SCHEMA,
    )
    return out.commit_shard(
        sid, run_id=run_id, fingerprint=fp, predictions=_preds(n, int(sid) * 1000), errors=errs
    )


def _manifest(out: OutputDir, *, state: str = "succeeded", total: int = 3, kind: str = "inference") -> None:
    out.write_manifest(
        {
            "format": OUTPUT_FORMAT,
            "kind": kind,
            "name": "j",
            "state": state,
            "fingerprint": FP,
            "shards_total": total,
            "runs": [],
        }
    )


# --- where a job may write ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, why",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("/", "filesystem root"),
        ("file:///", "filesystem root"),
        (".", "working directory"),
        ("~", "home folder"),
        ("s3://bucket", "whole bucket"),
        ("s3://bucket/", "whole bucket"),
        ("data/*.parquet", "glob"),
    ],
)
def test_refused_output_locations(uri: str, why: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=why) as err:
        check_output_location(uri, key="output.uri")
    assert err.value.key == "output.uri"


def test_output_may_not_touch_input_or_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "in").mkdir(parents=True)
    (tmp_path / "data" / "in" / "a.parquet").write_bytes(b"x")
    (tmp_path / "models" / "m").mkdir(parents=True)
    protected = [("input.uri", "data/in/a.parquet"), ("stages[0].model", str(tmp_path / "models" / "m"))]
    cases = {
        "data/in": "a folder above input.uri",  # the input's own folder: --overwrite deleted the input once
        "data": "a folder above input.uri",  # the parent of the input
        "data/in/a.parquet": "the same folder as input.uri",
        "models/m": "the same folder as stages",
        "models/m/out": "inside stages",
        str(tmp_path): "working directory",
    }
    for uri, why in cases.items():
        with pytest.raises(SpecError, match=why.replace("[", r"\[")):
            check_output_location(uri, key="output.uri", protected=protected)
    # A folder input protects what is inside it too; siblings are fine.
    with pytest.raises(SpecError, match="inside input.uri"):
        check_output_location("data/in/out", key="output.uri", protected=[("input.uri", "data/in")])
    check_output_location("data/out", key="output.uri", protected=protected)
    check_output_location("s3://bucket/out", key="output.uri", protected=[("input.uri", "s3://bucket/in")])
    with pytest.raises(SpecError, match="a folder above input.uri"):
        check_output_location(
            "s3://bucket/in", key="output.uri", protected=[("input.uri", "s3://bucket/in/x.pq")]
        )


def test_foreign_folders_are_never_written_or_deleted(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    out = OutputDir(str(folder))
    for mode in ("resume", "overwrite", "error-if-exists"):
        with pytest.raises(OutputError, match=r"did not write \(notes.txt\)"):
            out.claim(kind="inference", mode=mode)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_overwrite_deletes_only_shardwise_names(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    _commit(out, "00000", 3, errors=1)
    _manifest(out)
    out.write_success()
    # A file someone added later is not ours: overwrite refuses rather than delete it with the rest.
    (tmp_path / "out" / "README").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        out.claim(kind="inference", mode="overwrite")
    (tmp_path / "out" / "README").unlink()
    assert out.claim(kind="inference", mode="overwrite") is None
    assert list((tmp_path / "out").iterdir()) == []


def test_inference_and_finetune_outputs_do_not_mix(tmp_path: Path) -> None:
    model = OutputDir(str(tmp_path / "model"))
    _manifest(model, kind="finetune")
    with pytest.raises(OutputError, match="holds a fine-tuned model"):
        model.claim(kind="inference", mode="overwrite")
    preds = OutputDir(str(tmp_path / "preds"))
    _manifest(preds)
    with pytest.raises(OutputError, match="predictions of a inference job"):
        preds.claim(kind="finetune", mode="overwrite")
    assert (tmp_path / "model" / "_manifest.json").exists() and (
        tmp_path / "preds" / "_manifest.json"
    ).exists()


# --- the lease -----------------------------------------------------------------------------------------------


def test_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    with Lease(out, "run-a", what="inference job 'j'"):
        with pytest.raises(OutputLocked, match=r"run run-a \(inference job 'j', pid \d+"):
            Lease(out, "run-b").acquire()
        assert read_lease(out).run_id == "run-a"
    assert not (tmp_path / "out" / LEASE).exists()  # released
    with Lease(out, "run-b"):
        assert read_lease(out).run_id == "run-b"


def test_lease_heartbeat_and_expiry(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    holder = Lease(out, "run-a", ttl_s=0.6).acquire()
    first = read_lease(out).heartbeat_at
    time.sleep(0.5)
    assert read_lease(out).heartbeat_at > first  # renewed every ttl/6
    with pytest.raises(OutputLocked):
        Lease(out, "run-b", ttl_s=0.6).acquire()
    holder._stop.set()  # the holder hangs: no more heartbeats
    holder._thread.join()
    time.sleep(0.8)
    with Lease(out, "run-b", ttl_s=0.6):  # expired: taken over
        assert read_lease(out).run_id == "run-b"
        with pytest.raises(OutputError, match="lost its lease"):
            holder.check()  # the old holder finds out before it writes _SUCCESS


def test_waiting_for_a_lease(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    holder = Lease(out, "run-a").acquire()
    t0 = time.monotonic()
    import threading

    threading.Timer(0.5, holder.release).start()
    with Lease(out, "run-b", wait_s=10):
        assert read_lease(out).run_id == "run-b"
    assert 0.4 < time.monotonic() - t0 < 5


def test_sigkilled_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    """A killed driver's lease does not block a rerun on the same machine (its pid is gone); elsewhere it
    expires after ttl_s (SHARDWISE_LEASE_TTL_S)."""
    code = (
        "import sys, time\n"
        "from pipeline.commit import OutputDir\n"
        "from pipeline.lease import Lease\n"
        "Lease(OutputDir(sys.argv[1]), 'killed-run').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "out")], cwd=repo, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    out = OutputDir(str(tmp_path / "out"))
    with pytest.raises(OutputLocked, match="killed-run"):
        Lease(out, "rerun").acquire()
    proc.kill()
    proc.wait()
    with Lease(out, "rerun"):
        assert read_lease(out).run_id == "rerun"


def test_lease_on_s3_is_a_conditional_put(s3_bucket: str, s3_storage_options: dict[str, Any]) -> None:
    out = OutputDir(f"s3://{s3_bucket}/out", storage_options=s3_storage_options)
    assert out.create_exclusive("_probe", b"one")
    assert not out.create_exclusive("_probe", b"two")
    assert out.read_bytes("_probe") == b"one"
    with Lease(out, "run-a"):
        with pytest.raises(OutputLocked):
            Lease(OutputDir(f"s3://{s3_bucket}/out", storage_options=s3_storage_options), "run-b").acquire()


# --- verified commit records ------------------------------------------------------------------------------


def test_records_are_checked_against_their_parts(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    for i, n in enumerate((10, 20, 30, 40, 50)):
        _commit(out, f"{i:05d}", n, errors=1 if i == 4 else 0)
    _commit(out, "00005", 5, fp="0" * 64)  # another job's record
    root = tmp_path / "out"
    (root / "part-00000.parquet").write_bytes(b"")  # truncated
    (root / "part-00001.parquet").write_bytes((root / "part-00002.parquet").read_bytes())  # swapped
    (root / "part-00003.parquet").unlink()  # deleted
    (root / "_errors" / "part-00004.parquet").unlink()
    good, bad = out.verified(out.read_records(), fingerprint=FP)
    assert sorted(good) == ["00002"]
    assert "0 bytes" in bad["00000"] and "bytes, its record says" in bad["00001"]
    assert "missing" in bad["00003"] and "_errors" in bad["00004"] and "fingerprint" in bad["00005"]
    # Same size, other bytes: only the hash can tell (--verify).
    data = bytearray((root / "part-00002.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "part-00002.parquet").write_bytes(bytes(data))
    assert "00002" in out.verified(out.read_records(), fingerprint=FP)[0]
    good, bad = out.verified(out.read_records(), fingerprint=FP, verify=True)
    assert good == {} and "sha256" in bad["00002"]


def test_corrupt_manifest_and_records_name_the_file(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    _commit(out, "00000", 3)
    (tmp_path / "out" / "_manifest.json").write_text("{not json")
    with pytest.raises(CorruptOutput, match=r"out/_manifest.json is not valid JSON.*--overwrite"):
        out.claim(kind="inference", mode="resume")
    _manifest(out)
    (tmp_path / "out" / "_shards" / "00000.json").write_text('{"shard_id": "00000"}')
    with pytest.raises(
        CorruptOutput, match=r"_shards/00000.json is not a shardwise commit record.*delete it"
    ):
        out.read_records()
    (tmp_path / "out" / "_manifest.json").write_text('["a list"]')
    with pytest.raises(CorruptOutput, match="not a shardwise manifest"):
        out.read_manifest()


def test_driver_cost_is_flat_per_shard(tmp_path: Path) -> None:
    """20,000 commit records through the driver's ledger (counters, compaction into segments) in well under
    a second; the records read back from the segments. bench/contract_scale.py has the real figures."""
    out = OutputDir(str(tmp_path / "out"))
    records = [
        ShardRecord(f"{i:06d}", "r1", FP, 50, 49, 1, 1000 + i, "h" * 64, 10, "e" * 64, 1.0 + i)
        for i in range(20_000)
    ]
    warm = Ledger(OutputDir(str(tmp_path / "warm")), run_id="w", previous={})
    warm.add(records[0])
    warm.flush()  # first use imports Arrow's writers: not a per-record cost
    (tmp_path / "out" / "_shards").mkdir(parents=True)
    for rec in records:  # the workers' single records, which compaction folds in and deletes
        (tmp_path / "out" / "_shards" / f"{rec.shard_id}.json").write_text("{}")
    ledger = Ledger(out, run_id="r1", previous={})
    # CPU time of this process: the driver's own cost, not the time it waits for a core on a loaded machine.
    t0 = time.process_time()
    for rec in records:
        ledger.add(rec)
    ledger.flush()
    elapsed = time.process_time() - t0
    assert (ledger.rows_in, ledger.rows_error, len(ledger.done)) == (1_000_000, 20_000, 20_000)
    assert elapsed < 1.0, f"{elapsed:.2f} CPU s for 20,000 records"
    assert sorted(p.name for p in (tmp_path / "out" / "_shards").iterdir()) == [
        "seg-r1-00000.parquet",
        "seg-r1-00001.parquet",
    ]
    back = out.read_records()
    assert len(back) == 20_000 and back["019999"] == records[-1]
    # A retried task's duplicate commit is not counted twice.
    assert not ledger.add(records[0]) and ledger.rows_in == 1_000_000


# --- planning Parquet on row groups ---------------------------------------------------------------------


def _spec(uri: str, **input_keys: Any):
    return parse_spec(
        {
            "name": "p",
            "input": {"uri": uri, **input_keys},
            "stages": [
                {"name": "s", "task": "text-classification", "model": "m", "inputs": {"text": "text"}}
            ],
            "output": {"uri": "out"},
        }
    )


def test_parquet_shards_follow_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(1000)]}), path, row_group_size=100)
    spec = _spec(str(path), shard_rows=250)
    shards = plan_shards(spec, list_fragments(spec.input))
    # Whole groups only: 2 groups (200 rows) per shard, never a cut through a group.
    assert [(s.start, s.stop) for s in shards] == [(i, i + 200) for i in range(0, 1000, 200)]
    assert all(s.fragment.row_groups == () for s in shards)  # shards do not carry the file's group list


def test_a_huge_row_group_is_streamed_and_flagged(tmp_path: Path) -> None:
    from pipeline.sources import read_shard

    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(20_000)]}), path, row_group_size=20_000)
    spec = _spec(str(path), shard_rows=1000)
    notes: list[str] = []
    shards = plan_shards(spec, list_fragments(spec.input), notes=notes)
    assert len(shards) == 20 and len(notes) == 1
    assert "row_group_size=1000" in notes[0] and "big.parquet" in notes[0]
    table = read_shard(spec.input, shards[7].fragment, shards[7].start, shards[7].stop, columns=["text"])
    assert table.column("text").to_pylist() == [f"t{i}" for i in range(7000, 8000)]


def test_limit_keeps_the_first_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(1000)]}), path, row_group_size=100)
    spec = _spec(str(path), shard_rows=300, limit=450)
    shards = plan_shards(spec, list_fragments(spec.input))
    assert sum(s.num_rows for s in shards) == 450 and shards[-1].stop == 450


def test_changed_or_shortened_input_fails_the_shard_naming_the_file(tmp_path: Path) -> None:
    from pipeline.errors import SourceError
    from pipeline.sources import read_shard

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(50)))
    spec = _spec(str(path), shard_rows=25)
    spec = spec.input
    shard = plan_shards(_spec(str(path), shard_rows=25), list_fragments(spec))[1]
    assert read_shard(spec, shard.fragment, shard.start, shard.stop, columns=["text"]).num_rows == 25
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(40)))
    with pytest.raises(SourceError, match=r"'in.jsonl' changed after the job was planned"):
        read_shard(spec, shard.fragment, shard.start, shard.stop, columns=["text"])
    # Same size and mtime but fewer rows (the listing cannot tell): the row count check can.
    st = os.stat(path)
    short = "".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(40))
    path.write_text(short + " " * (shard.fragment.size - len(short)))
    os.utime(path, ns=(st.st_atime_ns, int(float(shard.fragment.version) * 1e9)))
    if str(os.stat(path).st_mtime) == shard.fragment.version:  # the filesystem kept the mtime exactly
        with pytest.raises(SourceError, match=r"gave 15 rows for rows \[25, 50\)"):
            read_shard(spec, shard.fragment, shard.start, shard.stop, columns=["text"])


# --- status ---------------------------------------------------------------------------------------------------


def test_status_states(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    for i in range(3):
        _commit(out, f"{i:05d}", 10)
    _manifest(out, state="running")
    assert output_status(out.uri)["state"] == "interrupted"
    with Lease(out, "live"):
        info = output_status(out.uri)
        assert info["state"] == "running" and "live" in info["holder"] and info["exit_code"] == 5
    _manifest(out, state="succeeded")
    out.write_success()
    info = output_status(out.uri)
    assert (info["state"], info["exit_code"], info["shards_done"], info["rows_ok"]) == ("succeeded", 0, 3, 30)
    (tmp_path / "out" / "part-00001.parquet").unlink()
    info = output_status(out.uri)
    assert (info["state"], info["exit_code"]) == ("incomplete", 3)
    assert info["problems"] == ["shard 00001: part-00001.parquet is missing"]
    _manifest(out, state="failed")
    assert output_status(out.uri)["exit_code"] == 1
