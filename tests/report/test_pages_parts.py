"""Parts of report/preview that need no job: inputs found by row id (both id kinds), and a fine-tune's
report from its train_metrics.json."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.preview import _rows_by_id
from jobs.report import build_report
from pipeline.spec import InputSpec


def test_input_rows_are_found_by_default_id_and_by_id_column(tmp_path):
    """Only the rows asked for come back, from several row groups; an id the input lacks is left out."""
    rows = 300
    pq.write_table(
        pa.table({"key": [f"k{i}" for i in range(rows)], "text": [f"t{i}" for i in range(rows)]}),
        tmp_path / "in.parquet",
        row_group_size=50,
    )
    default = InputSpec(uri=str(tmp_path / "in.parquet"))
    assert _rows_by_id(default, {"in.parquet:3", "in.parquet:250", "in.parquet:999"}, ["text"]) == {
        "in.parquet:3": {"text": "t3"},
        "in.parquet:250": {"text": "t250"},
    }
    by_key = InputSpec(uri=str(tmp_path / "in.parquet"), id_column="key")
    assert _rows_by_id(by_key, {"k7", "k8", "k299", "nope"}, ["text"]) == {
        "k7": {"text": "t7"},
        "k8": {"text": "t8"},
        "k299": {"text": "t299"},
    }


def test_report_of_a_fine_tune_plots_its_epochs(tmp_path):
    manifest = {
        "kind": "finetune",
        "name": "ft",
        "state": "succeeded",
        "spec": {"input": {"uri": "train.parquet"}, "stages": [{"name": "s", "task": "text-classification"}]},
        "files": ["config.json"],
        "runs": [],
    }
    (tmp_path / "_manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "_SUCCESS").write_text("")
    epochs = [
        {"epoch": 1, "train_loss": 0.7, "eval_loss": 0.6, "eval_accuracy": 0.7},
        {"epoch": 2, "train_loss": 0.4, "eval_loss": 0.45, "eval_accuracy": 0.8},
    ]
    (tmp_path / "train_metrics.json").write_text(json.dumps({"best_epoch": 2, "epochs": epochs}))
    html, facts = build_report(str(tmp_path))
    assert facts == {"state": "succeeded", "plots": 2}
    assert "loss per epoch" in html and "eval scores per epoch" in html and "eval_accuracy" in html
    assert "No runtime metrics recorded for this run." in html
