"""What a new user runs into first: a folder input without `format`, a kept column named like a task field,
a trial run on the first rows, an honest summary of a no-op rerun, and mistakes caught by `validate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from pipeline.commit import read_output
from tests.helpers import make_texts, write_texts_parquet

pytestmark = pytest.mark.timeout(300)


def _job(tmp_path: Path, model: Path, **input_keys) -> str:
    spec = {
        "name": "newcomer",
        "input": {"uri": str(tmp_path / "reviews"), "id_column": "id", "shard_rows": 40, **input_keys},
        "stages": [
            {"name": "s", "task": "text-classification", "model": str(model), "inputs": {"text": "text"}}
        ],
        "output": {"uri": str(tmp_path / "out")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_folder_input_rename_limit_and_honest_summary(ray_session, tiny_model, tmp_path, capsys):
    for part in range(2):  # a folder of Parquet files; no input.format anywhere
        texts = make_texts(50, seed=part)
        write_texts_parquet(
            tmp_path / "reviews" / f"part-{part}.parquet",
            texts,
            extra={"id": list(range(part * 50, part * 50 + 50)), "label": ["gold"] * 50},
        )
    # `label` is also a field the task writes: refused with the fix, then kept under another name.
    job = _job(tmp_path, tiny_model, keep_columns=["id", "label"])
    assert main(["validate", job]) == 2
    assert "keep_columns: {label: input_label}" in capsys.readouterr().err
    job = _job(tmp_path, tiny_model, keep_columns={"id": "id", "label": "gold_label"})
    assert main(["validate", job]) == 0
    assert "100 rows in 2 file(s)" in capsys.readouterr().out

    assert (
        main(["run", job, "--limit", "30", "--no-progress", "--set", f"output.uri={tmp_path / 'trial'}"]) == 0
    )
    assert "30 rows ok" in capsys.readouterr().out
    assert sorted(read_output(str(tmp_path / "trial")).column("id").to_pylist()) == list(range(30))

    assert main(["run", job, "--no-progress"]) == 0
    assert "100 rows ok, 0 errors" in capsys.readouterr().out
    out = read_output(str(tmp_path / "out"))
    assert out.column_names == ["id", "gold_label", "label", "score"]
    assert set(out.column("gold_label").to_pylist()) == {"gold"}
    # A rerun with nothing left says so instead of printing "0.0 rows/s".
    assert main(["run", job, "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "nothing to do, all 4 shards were already committed" in said and "rows/s" not in said


def test_validate_catches_mistakes_before_ray(tiny_model, tmp_path, capsys):
    write_texts_parquet(tmp_path / "reviews" / "part-0.parquet", make_texts(10))
    job = yaml.safe_load(Path(_job(tmp_path, tiny_model)).read_text())

    def validate(**changes) -> str:
        spec = yaml.safe_load(yaml.safe_dump(job))
        for key, value in changes.items():
            section, _, name = key.partition("__")
            (spec["stages"][0] if section == "stage" else spec[section])[name] = value
        (tmp_path / "v.yaml").write_text(yaml.safe_dump(spec))
        assert main(["validate", str(tmp_path / "v.yaml")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    typo = str(tiny_model) + "-typo"
    assert f"stages[0].model: model {typo!r}" in validate(stage__model=typo) or typo in validate(
        stage__model=typo
    )
    assert "did you mean 'text-classification'" in validate(stage__task="text-clasification")
    assert "does not exist" in validate(input__uri=str(tmp_path / "nowhere.parquet"))
    assert "column 'body' is not in the input" in validate(stage__inputs={"text": "body"})
    assert "a folder above input.uri" in validate(output__uri=str(tmp_path))
