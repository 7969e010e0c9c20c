"""`shardwise evaluate` on outputs built by hand (part files, error records and a manifest written the way
pipeline.execute writes them), so no Ray is needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.commit import OUTPUT_FORMAT, OutputDir, error_schema


def _output(
    path: Path,
    *,
    task: str,
    inputs: dict[str, str],
    job_input: dict[str, Any],
    predictions: pa.Table,
    error_ids: pa.Array | None = None,
    id_field: pa.Field | None = None,
) -> OutputDir:
    out = OutputDir(str(path))
    schema = error_schema(id_field)
    errors = schema.empty_table()
    if error_ids is not None:
        n = len(error_ids)
        errors = pa.table(
            [error_ids, pa.array(["f"] * n), pa.array([0] * n, pa.int64()), pa.array(["s"] * n),
             pa.array(["preprocess"] * n), pa.array(["ValueError"] * n), pa.array(["bad row"] * n)],
            schema=schema,
        )  # fmt: skip
    out.commit_shard("00000", run_id="r1", fingerprint="fp", predictions=predictions, errors=errors)
    spec = {
        "name": "t",
        "kind": "inference",
        "input": {"format": None, "id_column": None, "keep_columns": None, **job_input},
        "stages": [{"name": "s", "task": task, "model": "/m", "inputs": inputs, "params": {}}],
        "output": {"uri": str(path), "mode": "resume"},
    }
    out.write_manifest(
        {"format": OUTPUT_FORMAT, "kind": "inference", "name": "t", "state": "succeeded", "spec": spec}
    )
    return out


def test_a_stage_of_a_multi_stage_output(tmp_path, capsys):
    """A DAG's output holds one struct column per stage: `--stage` scores one of them (and is required when
    several are written); the report goes to _metrics/eval-<stage>.json."""
    struct = pa.struct([("label", pa.string()), ("score", pa.float64())])
    preds = pa.table(
        {
            "id": pa.array([1, 2, 3, 4], pa.int64()),
            "gold": ["pos", "pos", "neg", "neg"],
            "review": pa.array(
                [{"label": lab, "score": 0.9} for lab in ["pos", "neg", "neg", "neg"]], struct
            ),
            "summary": pa.array(
                [{"label": lab, "score": 0.9} for lab in ["neg", "pos", "neg", "pos"]], struct
            ),
        }
    )
    out = _output(
        tmp_path / "out",
        task="text-classification",
        inputs={"text": "text"},
        job_input={
            "uri": str(tmp_path / "in.parquet"),
            "id_column": "id",
            "keep_columns": {"id": "id", "label": "gold"},
        },
        predictions=preds,
        id_field=pa.field("id", pa.int64()),
    )
    manifest = out.read_manifest()
    stage = manifest["spec"]["stages"][0]
    manifest["spec"]["stages"] = [
        {**stage, "name": "review"},
        {**stage, "name": "summary", "inputs": {"text": "x.y"}},
    ]
    out.write_manifest(manifest)
    assert main(["evaluate", str(tmp_path / "out"), "--labels", "gold"]) == 2
    assert "--stage: the job has 2 stages; name the one to score: review" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "out"), "--labels", "gold", "--stage", "review"]) == 0
    assert main(["evaluate", str(tmp_path / "out"), "--labels", "gold", "--stage", "summary"]) == 0
    metrics = tmp_path / "out" / "_metrics"
    review = json.loads((metrics / "eval-review.json").read_text())
    summary = json.loads((metrics / "eval-summary.json").read_text())
    assert (review["stage"], review["metrics"]["accuracy"]) == ("review", pytest.approx(0.75))
    assert (summary["stage"], summary["metrics"]["accuracy"]) == ("summary", pytest.approx(0.5))


def _eval_json(path: Path) -> dict[str, Any]:
    return json.loads((path / "_metrics" / "eval.json").read_text())


def test_text_classification_labels_kept_in_output(tmp_path, capsys):
    # 4 predictions (3 right: accuracy 0.75, macro-F1 11/15 as in tests/models/test_metrics.py) + 1 error record.
    preds = pa.table(
        {
            "id": pa.array([1, 2, 3, 4], pa.int64()),
            "gold": ["pos", "pos", "neg", "neg"],  # the input's `label` column, kept renamed
            "label": ["pos", "neg", "neg", "neg"],
            "score": [0.9, 0.8, 0.7, 0.6],
        }
    )
    out = _output(
        tmp_path / "out",
        task="text-classification",
        inputs={"text": "text"},
        job_input={
            "uri": str(tmp_path / "missing.parquet"),
            "id_column": "id",
            "keep_columns": {"id": "id", "label": "gold"},
        },
        predictions=preds,
        error_ids=pa.array([5], pa.int64()),
        id_field=pa.field("id", pa.int64()),
    )
    report_file = tmp_path / "report.json"
    # the kept column by its input name: the same labels
    assert main(["evaluate", str(tmp_path / "out"), "--labels", "label"]) == 0
    assert _eval_json(tmp_path / "out")["metrics"]["accuracy"] == pytest.approx(0.75)
    # ... and by its name in the output
    assert main(["evaluate", str(tmp_path / "out"), "--labels", "gold", "-o", str(report_file)]) == 0
    report = _eval_json(tmp_path / "out")
    assert report["task"] == "text-classification"
    assert report["labels_from"] == "output"
    assert (report["rows_scored"], report["rows_missing"], report["rows_unmatched"]) == (4, 1, 0)
    assert report["metrics"]["accuracy"] == pytest.approx(0.75)
    assert report["metrics"]["macro_f1"] == pytest.approx(11 / 15)
    assert report["per_class"]["pos"]["recall"] == pytest.approx(0.5)
    assert json.loads(report_file.read_text())["metrics"] == report["metrics"]
    printed = capsys.readouterr().out
    assert (
        "accuracy" in printed and "0.7500" in printed and "without a prediction (error records) 1" in printed
    )
    # the report is shardwise's own file: a resume does not see a foreign file, --overwrite deletes it
    manifest = out.read_manifest()
    assert out.foreign_names("inference", manifest) == []
    out.delete_own("inference", manifest)
    assert not (tmp_path / "out" / "_metrics").exists()


@pytest.mark.parametrize("labels_where", ["job input", "--input"])
def test_asr_labels_read_from_input_by_id(tmp_path, labels_where):
    ids = pa.array(["a", "b", "c", "d"])
    transcripts = ["the cat sat up", "hello world", "never predicted", "unused"]
    audio = pa.array([b"RIFF"] * 4, pa.binary())
    if labels_where == "job input":
        job_file = tmp_path / "speech.parquet"
        pq.write_table(pa.table({"key": ids, "audio": audio, "transcript": transcripts}), job_file)
        extra: list[str] = []
    else:  # the job read audio only; the transcripts are in a separate JSONL file with the same ids
        job_file = tmp_path / "speech.parquet"
        pq.write_table(pa.table({"key": ids, "audio": audio}), job_file)
        labels_file = tmp_path / "labels.jsonl"
        labels_file.write_text(
            "".join(
                json.dumps({"key": k, "transcript": t}) + "\n"
                for k, t in zip(ids.to_pylist(), transcripts, strict=True)
            )
        )
        extra = ["--input", str(labels_file)]
    # row a: 1 word wrong of 4; row b: right → WER 1/6 over the corpus. Row c failed; row zz is not in the input.
    preds = pa.table({"key": ["a", "b", "zz"], "text": ["the cat sat down", "hello world", "stray"]})
    _output(
        tmp_path / "out",
        task="automatic-speech-recognition",
        inputs={"audio": "audio"},
        job_input={"uri": str(job_file), "id_column": "key"},
        predictions=preds,
        error_ids=pa.array(["c"]),
        id_field=pa.field("key", pa.string()),
    )
    assert main(["evaluate", str(tmp_path / "out"), "--labels", "transcript", *extra]) == 0
    report = _eval_json(tmp_path / "out")
    expected_source = job_file if labels_where == "job input" else tmp_path / "labels.jsonl"
    assert report["labels_from"] == f"input {expected_source}"
    assert (report["rows_scored"], report["rows_missing"], report["rows_unmatched"]) == (2, 1, 1)
    assert report["metrics"]["wer"] == pytest.approx(1 / 6)


def test_token_classification_tags_joined_by_default_row_id(tmp_path):
    # No id column: rows join on the default id `<file>:<row>`; the tags need the text, read from the input too.
    data = tmp_path / "ner.parquet"
    pq.write_table(
        pa.table({"sentence": ["Ada Lovelace met Babbage"], "tags": [["B-PER", "I-PER", "O", "B-PER"]]}), data
    )
    ents = [
        {"entity_group": "PER", "score": 0.9, "word": "Ada Lovelace", "start": 0, "end": 12},
        {"entity_group": "PER", "score": 0.9, "word": "Babbage", "start": 17, "end": 24},
    ]
    preds = pa.table({"id": ["ner.parquet:0"], "entities": [ents]})
    _output(
        tmp_path / "out",
        task="token-classification",
        inputs={"text": "sentence"},
        job_input={"uri": str(data)},
        predictions=preds,
    )
    assert main(["evaluate", str(tmp_path / "out"), "--labels", "tags", "--json"]) == 0
    assert _eval_json(tmp_path / "out")["metrics"]["f1"] == pytest.approx(1.0)


def test_refusals_exit_2_with_a_reason(tmp_path, capsys):
    preds = pa.table({"id": pa.array([1], pa.int64()), "label": ["pos"], "score": [0.9]})
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array([1], pa.int64()), "text": ["good"]}), data)
    _output(
        tmp_path / "out",
        task="text-classification",
        inputs={"text": "text"},
        job_input={"uri": str(data), "id_column": "id"},
        predictions=preds,
        id_field=pa.field("id", pa.int64()),
    )
    assert main(["evaluate", str(tmp_path / "out"), "--labels", "gold"]) == 2
    assert "'gold' is neither kept in the output nor in the input" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "out"), "--labels", "text", "--task", "fill-mask"]) == 2
    assert "has no metrics; tasks with metrics:" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(preds, foreign / "part-0.parquet")
    assert main(["evaluate", str(foreign), "--labels", "label"]) == 2
    assert "not an output of `shardwise run`" in capsys.readouterr().err
    assert not (foreign / "_metrics").exists()
