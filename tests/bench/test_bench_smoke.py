"""bench.text_classification end to end on a tiny model and 200 texts: the four systems run, their labels
agree, and the JSON result has the fields the table and later comparisons read. No speed ratios are
asserted: on a tiny model every Ray job is all overhead, and shared machines are noisy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import build_texts
from bench.text_classification import SYSTEMS, BenchConfig, run_benchmark
from tests.helpers import make_text_classifier, make_texts

ROWS = 200


@pytest.mark.timeout(300)
def test_all_four_systems_run_agree_and_write_json(tmp_path: Path) -> None:
    model_dir = make_text_classifier(tmp_path / "model", num_labels=3)
    texts = build_texts(
        make_texts(40, seed=1, min_words=3, max_words=20), ROWS, seed=0, min_words=5, max_words=60
    )
    assert len(texts) == ROWS and all(5 <= len(t.split()) <= 60 for t in texts)
    cfg = BenchConfig(rows=ROWS, batch_size=16, shard_rows=50, warmup_rows=8)

    payload, path = run_benchmark(
        cfg,
        model_dir=model_dir,
        texts=texts,
        work_dir=tmp_path / "work",
        results_dir=tmp_path / "results",
        log=lambda _: None,
    )

    assert path.parent == tmp_path / "results" and path.name.startswith("text_classification-")
    saved = json.loads(path.read_text())
    for key in (
        "benchmark",
        "config",
        "machine",
        "model",
        "data",
        "reference",
        "systems",
        "agreement_vs_reference",
        "agreement_pairwise",
    ):
        assert key in saved, key
    assert saved["reference"] == "pipeline"
    for key in ("cpu_count", "torch_threads", "device"):
        assert saved["machine"][key] is not None, key
    assert saved["data"]["rows"] == ROWS

    assert set(saved["systems"]) == set(SYSTEMS)
    for name, fig in saved["systems"].items():
        assert fig["rows_per_s"] > 0 and fig["steady_rows_per_s"] > 0, name
        assert fig["startup_s"] >= 0 and fig["wall_s"] > 0, name
        assert fig["steady_rows_per_s_vs_pipeline"] is not None, name
        assert [r["rows"] for r in fig["repeats"]] == [ROWS], name
    assert saved["systems"]["shardwise"]["repeats"][0]["extra"]["shards"] == ROWS // 50

    # Same model, same texts: every system predicts the same labels (a tiny random model has near-ties,
    # hence not exactly 100%).
    for name, share in saved["agreement_vs_reference"].items():
        assert share >= 0.99, (name, share)
    for pair, share in saved["agreement_pairwise"].items():
        assert share >= 0.99, (pair, share)
