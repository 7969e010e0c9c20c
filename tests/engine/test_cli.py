"""The `shardwise` CLI: exit codes, one-paragraph errors, status and tasks output."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from pipeline.commit import OutputDir
from pipeline.execute import run_inference
from pipeline.spec import parse_spec
from tests.engine.readback import assert_each_id_once, errors_by_id, predictions_by_id
from tests.helpers import job_dict, make_texts, write_texts_parquet

EXAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "examples"


def test_every_shipped_example_spec_validates():
    specs = sorted(EXAMPLES.rglob("*.yaml"))
    assert len(specs) >= 2
    for path in specs:
        assert main(["validate", "--spec-only", str(path)]) == 0, path


def test_spec_error_names_the_key_and_exits_2(tmp_path, capsys):
    spec = job_dict(input_uri="in.parquet", output_uri="out", model="m")
    spec["stages"][0]["batchsize"] = 8
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages[0].batchsize" in err and "did you mean 'batch_size'" in err
    assert "Traceback" not in err


def test_bad_override_value_names_the_key(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(input_uri="in.parquet", output_uri="out", model="m")))
    assert main(["validate", str(path), "--set", "output.mode=append"]) == 2
    assert "output.mode" in capsys.readouterr().err


def test_tasks_lists_inputs_and_output_schema(capsys):
    assert main(["tasks", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    tc = listing["text-classification"]
    assert tc["inputs"] == {"text": "required", "text_pair": "optional"}
    assert set(tc["output"]) == {"label", "score"}


@pytest.mark.timeout(240)
def test_run_then_status_then_error_rate_exit_code(ray_session, tiny_model, tmp_path, capsys):
    texts: list = make_texts(80, seed=30)
    write_texts_parquet(tmp_path / "in.parquet", texts)
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            job_dict(
                input_uri=str(tmp_path / "in.parquet"),
                output_uri=str(tmp_path / "out"),
                model=str(tiny_model),
            )
        )
    )
    assert main(["run", str(path), "--no-progress"]) == 0
    assert "80 rows ok, 0 errors" in capsys.readouterr().out
    assert_each_id_once(str(tmp_path / "out"), range(80))
    assert main(["status", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == {
        **info,
        "state": "succeeded",
        "shards_done": 2,
        "shards_total": 2,
        "rows_ok": 80,
        "rows_error": 0,
    }

    texts[::4] = [None] * 20  # 25% bad rows against the default max_error_rate of 1%
    write_texts_parquet(tmp_path / "bad.parquet", texts)
    assert (
        main(
            [
                "run",
                str(path),
                "--no-progress",
                "--set",
                f"input.uri={tmp_path / 'bad.parquet'}",
                "--set",
                f"output.uri={tmp_path / 'out-bad'}",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    # The job stops early once it can no longer pass, so the count covers the shards it ran.
    assert re.search(r"\d+ of \d+ rows failed", err) and "max_error_rate" in err and "Traceback" not in err
    # The shards it committed (row ranges of the file: together one run of ids from either end) hold each
    # of their rows once, the null rows as error records and the others as predictions.
    preds, errors = predictions_by_id(str(tmp_path / "out-bad")), errors_by_id(str(tmp_path / "out-bad"))
    ids = sorted(set(preds) | set(errors))
    assert (
        len(ids)
        == len(preds) + len(errors)
        == sum(r.rows_in for r in OutputDir(str(tmp_path / "out-bad")).committed().values())
    )
    assert ids == list(range(ids[0], ids[-1] + 1)) and (ids[0] == 0 or ids[-1] == 79)
    assert all(i % 4 for i in preds) and all(i % 4 == 0 for i in errors)
    assert main(["status", str(tmp_path / "out-bad")]) == 1  # a failed output: non-zero
    assert "failed" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_status_watch_follows_a_running_job_until_it_ends(ray_session, tiny_model, tmp_path, capsys):
    """`status --watch` refreshes (rows, rows/s, ETA) while the job holds the output, then prints the final
    state and exits with its code."""
    write_texts_parquet(tmp_path / "in.parquet", make_texts(400, seed=40, max_words=60))
    spec = job_dict(
        input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "out"), model=str(tiny_model)
    )
    spec["stages"][0]["batch_size"] = 1  # slow enough to be watched
    done: dict = {}
    job = threading.Thread(
        target=lambda: done.setdefault("result", run_inference(parse_spec(spec), progress=False))
    )
    job.start()
    deadline = time.time() + 120
    while not (tmp_path / "out" / "_lease.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert main(["status", str(tmp_path / "out"), "--watch", "--interval", "0.5"]) == 0
    job.join(timeout=120)
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    frames = [line for line in lines if "rows/s" in line and not line.lstrip().startswith("stage ")]
    assert len(frames) >= 2, printed
    # each stage's line under the job's (its live figures appear once the metrics have been drained: timing)
    assert any(line.lstrip().startswith("stage s:") for line in lines), printed
    assert "/400 (" in frames[-1] and "ETA" in frames[-1]
    assert "test-job: succeeded" in printed.split(frames[-1])[-1]  # the final state, after the last frame
    assert done["result"].rows_ok == 400
