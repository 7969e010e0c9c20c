"""The output contract under real use, end to end: refused outputs, two writers, damaged parts, foreign
records, a changed input, empty inputs and corrupt manifests — each probe of the contract issue as a test."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from pipeline.commit import OutputDir, read_errors, read_output
from pipeline.errors import OutputLocked, ShardwiseError
from pipeline.execute import run_inference
from pipeline.spec import parse_spec
from tests.helpers import job_dict, make_text_classifier, make_texts, write_texts_parquet

pytestmark = pytest.mark.timeout(300)


def _spec(tmp_path: Path, model: Path, *, out: str = "out", batch_size: int = 16, **kw):
    return job_dict(
        input_uri=str(tmp_path / "data" / "in.parquet"),
        output_uri=str(tmp_path / out),
        model=str(model),
        stages=[
            {
                "name": "s",
                "task": "text-classification",
                "model": str(model),
                "inputs": {"text": "text"},
                "batch_size": batch_size,
            }
        ],
        **kw,
    )


def _yaml(tmp_path: Path, spec: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _ids(out: Path) -> list[int]:
    preds = read_output(str(out)).column("id").to_pylist()
    errors = read_errors(str(out))
    return sorted(preds + [int(i) for i in errors.column("id").to_pylist()])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refusals_destroy_nothing(tiny_model, tmp_path, monkeypatch, capsys):
    """Probes: --overwrite with the output at the input's folder, its parent, `~`, `/`, "", "." and the
    model folder deleted files once. Each is refused before anything runs; every file is still there."""
    write_texts_parquet(tmp_path / "data" / "in.parquet", make_texts(20))
    (tmp_path / "data" / "unrelated.txt").write_text("not shardwise's")
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    model_before = _snapshot(tiny_model)
    cases = {
        str(tmp_path / "data"): "a folder above input.uri",
        str(tmp_path): "working directory",
        "~": "home folder",
        "/": "filesystem root",
        "": "is empty",
        ".": "working directory",
        "file:///": "filesystem root",
        str(tiny_model): "the same folder as stages",
    }
    for uri, why in cases.items():
        spec = _yaml(tmp_path / "home", {**_spec(tmp_path, tiny_model), "output": {"uri": uri}})
        assert main(["run", spec, "--overwrite", "--no-progress"]) == 2, uri
        err = capsys.readouterr().err
        assert "output.uri" in err and why in err, (uri, err)
        assert main(["validate", spec]) == 2
        capsys.readouterr()
        Path(spec).unlink()
    assert _snapshot(tmp_path) == before and _snapshot(tiny_model) == model_before


def test_output_in_a_folder_shardwise_did_not_write_is_refused(tiny_model, tmp_path, capsys):
    """Probe: an inference job whose output was a fine-tuned model's folder (or any non-empty foreign
    folder) wrote its parts into it. Now it is refused, with or without --overwrite."""
    write_texts_parquet(tmp_path / "data" / "in.parquet", make_texts(20))
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    spec = _yaml(tmp_path, {**_spec(tmp_path, tiny_model), "output": {"uri": str(other)}})
    for extra in ([], ["--overwrite"]):
        assert main(["run", spec, "--no-progress", *extra]) == 2
        assert "did not write" in capsys.readouterr().err
    assert _snapshot(other) == _snapshot(tiny_model)
    # A fine-tune's output (its manifest says kind: finetune) is refused by name.
    OutputDir(str(tmp_path / "ft")).write_manifest(
        {"format": 2, "kind": "finetune", "name": "ft", "files": []}
    )
    spec = _yaml(tmp_path, {**_spec(tmp_path, tiny_model), "output": {"uri": str(tmp_path / "ft")}})
    assert main(["run", spec, "--overwrite", "--no-progress"]) == 2
    assert "holds a fine-tuned model" in capsys.readouterr().err


def test_empty_input_is_an_error_unless_allowed(tiny_model, tmp_path, capsys):
    write_texts_parquet(tmp_path / "data" / "in.parquet", [])
    spec = _spec(tmp_path, tiny_model)
    assert main(["run", _yaml(tmp_path, spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no rows" in err and "input.allow_empty" in err
    assert not (tmp_path / "out").exists()
    spec["input"]["allow_empty"] = True
    assert main(["run", _yaml(tmp_path, spec), "--no-progress"]) == 0
    assert (tmp_path / "out" / "_SUCCESS").exists() and not list((tmp_path / "out").glob("part-*"))


def test_corrupt_manifest_exits_2_naming_the_file(ray_session, tiny_model, tmp_path, capsys):
    write_texts_parquet(tmp_path / "data" / "in.parquet", make_texts(60, seed=1))
    spec = _yaml(tmp_path, _spec(tmp_path, tiny_model))
    assert main(["run", spec, "--no-progress"]) == 0
    capsys.readouterr()
    (tmp_path / "out" / "_manifest.json").write_text('{"kind": "inference", "fing')
    for cmd in (["run", spec, "--no-progress"], ["status", str(tmp_path / "out")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert (
            "out/_manifest.json is not valid JSON" in err and "--overwrite" in err and "Traceback" not in err
        )


def test_two_runs_on_one_output_compute_each_row_once(ray_session, tiny_model, tmp_path):
    """Probe: two runs on one output both computed all shards, and an --overwrite during a run deleted parts
    under it (500 rows missing behind a _SUCCESS). Now the second run is refused naming the holder, an
    overwrite is refused too, and a run told to wait resumes once the first is done: nothing to compute."""
    n = 1200
    write_texts_parquet(tmp_path / "data" / "in.parquet", make_texts(n, seed=2, max_words=80))
    spec = parse_spec(_spec(tmp_path, tiny_model, batch_size=1))
    outcome: dict = {}

    def run(key: str, **kw) -> None:
        try:
            outcome[key] = run_inference(spec, progress=False, **kw)
        except BaseException as e:  # noqa: BLE001 - asserted below
            outcome[key] = e

    first = threading.Thread(target=run, args=("first",))
    first.start()
    lease = tmp_path / "out" / "_lease.json"
    deadline = time.time() + 120
    while (
        not list((tmp_path / "out" / "_shards").glob("*.json"))
        if (tmp_path / "out" / "_shards").exists()
        else True
    ):
        assert time.time() < deadline and first.is_alive(), outcome
        time.sleep(0.05)
    holder = json.loads(lease.read_text())["run_id"]
    with pytest.raises(OutputLocked, match=holder):
        run_inference(spec, progress=False)
    with pytest.raises(OutputLocked, match=holder):
        run_inference(spec, progress=False, overwrite=True)
    waiter = threading.Thread(target=run, args=("waiter",), kwargs={"wait_s": 240})
    waiter.start()
    first.join(timeout=280)
    waiter.join(timeout=60)
    assert isinstance(outcome["first"], object) and not isinstance(outcome["first"], BaseException), outcome
    assert outcome["first"].state == "succeeded" and outcome["first"].shards_run == n // 50
    second = outcome["waiter"]
    assert not isinstance(second, BaseException), second
    assert (second.state, second.shards_run, second.shards_skipped) == ("succeeded", 0, n // 50)
    assert _ids(tmp_path / "out") == list(range(n))
    assert not lease.exists()


def test_damaged_parts_are_found_by_status_and_recomputed(ray_session, tiny_model, tmp_path, capsys):
    """Probe: resume trusted that a part existed: a truncated part, a part overwritten by another shard's,
    were accepted (100 rows lost, 50 duplicated) and `status` said succeeded. Now status says incomplete
    and names them, and a rerun recomputes exactly those shards."""
    write_texts_parquet(tmp_path / "data" / "in.parquet", make_texts(300, seed=3))
    spec = _spec(tmp_path, tiny_model)
    path = _yaml(tmp_path, spec)
    assert main(["run", path, "--no-progress"]) == 0
    out = tmp_path / "out"
    reference = read_output(str(out)).sort_by("id")
    (out / "part-00000.parquet").write_bytes(b"")
    (out / "part-00001.parquet").write_bytes((out / "part-00002.parquet").read_bytes())
    (out / "part-00003.parquet").unlink()
    capsys.readouterr()
    assert main(["status", str(out)]) == 3
    shown = capsys.readouterr().out
    assert "incomplete" in shown and all(f"shard 0000{i}" in shown for i in (0, 1, 3))
    result = run_inference(parse_spec(spec), progress=False)
    assert (result.shards_run, result.shards_skipped) == (3, 3)
    assert read_output(str(out)).sort_by("id").equals(reference)
    assert main(["status", str(out)]) == 0
    # A part changed in place with its size kept is only caught with --verify (hashes).
    data = bytearray((out / "part-00004.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "part-00004.parquet").write_bytes(bytes(data))
    assert run_inference(parse_spec(spec), progress=False).shards_run == 0
    assert main(["status", str(out), "--verify"]) == 3
    assert run_inference(parse_spec(spec), progress=False, verify=True).shards_run == 1
    assert read_output(str(out)).sort_by("id").equals(reference)


def test_records_of_another_model_are_recomputed(ray_session, tiny_model, tmp_path):
    """Probe: a manifest carrying another model's results was accepted. Commit records carry the job
    fingerprint: parts committed by another job (here: another model) are computed again."""
    write_texts_parquet(tmp_path / "data" / "in.parquet", make_texts(150, seed=4))
    other_model = make_text_classifier(tmp_path / "other-model", num_labels=3, seed=7)
    mine = parse_spec(_spec(tmp_path, tiny_model))
    theirs = parse_spec(_spec(tmp_path, other_model, out="out-other"))
    run_inference(mine, progress=False)
    reference = read_output(str(tmp_path / "out")).sort_by("id")
    run_inference(theirs, progress=False)
    for name in ("part-00001.parquet", "part-00002.parquet"):  # their parts and records copied over ours
        shutil.copy(tmp_path / "out-other" / name, tmp_path / "out" / name)
    for rec in ("00001", "00002"):
        seg_free = OutputDir(str(tmp_path / "out-other")).committed()[rec]
        (tmp_path / "out" / "_shards" / f"{rec}.json").write_text(json.dumps(seg_free.__dict__))
    assert read_output(str(tmp_path / "out")).sort_by("id") != reference
    result = run_inference(mine, progress=False)
    assert result.shards_run == 2
    assert read_output(str(tmp_path / "out")).sort_by("id").equals(reference)


@pytest.mark.timeout(600)
def test_input_shortened_mid_run_fails_naming_the_file(ray_session, tiny_model, tmp_path, monkeypatch):
    """Probe: an input file shortened by 10 rows mid-run gave _SUCCESS with a shard of 40 rows planned as
    50. Now the shard's read sees the file changed and the job fails with the file's name; no _SUCCESS.
    (The file is cut right after the plan, before any shard is read: Ray Data reads ahead, so a cut at a
    random moment may come after every read — when the rows read are the planned ones, which is fine.)"""
    import pipeline.execute as execute

    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(make_texts(300, seed=5))]
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jsonl").write_text("\n".join(lines) + "\n")
    spec = parse_spec(
        {
            **_spec(tmp_path, tiny_model),
            "input": {"uri": str(data / "in.jsonl"), "id_column": "id", "shard_rows": 50},
        }
    )
    real_init = execute.init_ray

    def cut_then_start(**kw):
        (data / "in.jsonl").write_text("\n".join(lines[:-10]) + "\n")
        return real_init(**kw)

    monkeypatch.setattr(execute, "init_ray", cut_then_start)
    with pytest.raises(ShardwiseError, match="'in.jsonl' changed after the job was planned") as err:
        run_inference(spec, progress=False)
    assert "Traceback" not in str(err.value) and "rerun" in str(err.value).lower()
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["state"] == "failed" and "in.jsonl" in manifest["reason"]
    monkeypatch.setattr(execute, "init_ray", real_init)
    # The rerun plans the input as it is now: a changed input is a changed job, refused without --overwrite.
    with pytest.raises(ShardwiseError, match="input"):
        run_inference(spec, progress=False)
    assert run_inference(spec, progress=False, overwrite=True).rows_ok == 290


def test_verify_input_catches_an_edit_in_place(ray_session, tiny_model, tmp_path):
    """Rows edited in place with the same size and mtime are invisible to the listing (the fingerprint and
    each shard's identity check pass); --verify-input hashes the files and refuses to resume over them."""
    path = tmp_path / "data" / "in.jsonl"
    path.parent.mkdir()
    rows = [json.dumps({"id": i, "text": t}) for i, t in enumerate(make_texts(80, seed=6))]
    path.write_text("\n".join(rows) + "\n")
    spec = parse_spec(
        {**_spec(tmp_path, tiny_model), "input": {"uri": str(path), "id_column": "id", "shard_rows": 40}}
    )
    first = run_inference(spec, progress=False, verify_input=True)  # records the files' sha256
    assert first.rows_ok == 80
    st = path.stat()
    edited = rows[:]
    edited[3] = rows[3].replace('"text": "', '"text": "X', 1)[:-3] + rows[3][-2:]  # same length, new text
    assert len(edited[3]) == len(rows[3]) and edited[3] != rows[3]
    path.write_text("\n".join(edited) + "\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert run_inference(spec, progress=False).shards_run == 0  # the listing cannot tell
    with pytest.raises(ShardwiseError, match=r"\['in.jsonl'\] changed content"):
        run_inference(spec, progress=False, verify_input=True)
