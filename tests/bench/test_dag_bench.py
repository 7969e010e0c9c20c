"""bench.dag end to end on tiny models and 200 texts: the 2-stage DAG and the two single-stage jobs both
process every row, their per-stage predictions agree, and the JSON result has the fields the table reads.
No speed ratio is asserted: on tiny models every job is all overhead, and shared machines are noisy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import build_texts
from bench.dag import STAGES, SYSTEMS, DagBenchConfig, format_table, run_benchmark
from tests.helpers import make_text_classifier, make_texts
from tests.models.nlp_helpers import make_token_classifier

ROWS = 200


@pytest.mark.slow  # three Ray jobs, each starting its replicas: ~40-70 s on 2 shared cores
@pytest.mark.timeout(300)
def test_dag_and_back_to_back_process_every_row_and_agree(ray_session, tmp_path: Path) -> None:
    models = {
        "entities": make_token_classifier(tmp_path / "ner"),
        "sentiment": make_text_classifier(tmp_path / "cls", num_labels=2),
    }
    texts = build_texts(make_texts(40, seed=1, min_words=3, max_words=20), ROWS, seed=0, max_words=60)
    cfg = DagBenchConfig(rows=ROWS, shard_rows=50, batch_size=16, warmup_rows=0)

    payload, path = run_benchmark(
        cfg,
        model_dirs=models,
        texts=texts,
        work_dir=tmp_path / "work",
        results_dir=tmp_path / "results",
        log=lambda _: None,
    )

    assert path.parent == tmp_path / "results" and path.name.startswith("dag-")
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(payload))
    for key in ("config", "machine", "stages", "data", "systems", "ratios", "dag_stage_counts"):
        assert key in saved, key
    assert saved["data"] == {**saved["data"], "rows": ROWS, "shards": 4}

    assert set(saved["systems"]) == set(SYSTEMS)
    for name, fig in saved["systems"].items():
        assert fig["rows"] == ROWS, name
        assert fig["wall_s"] > 0 and fig["rows_per_s"] > 0, name
    # The back-to-back system is two jobs, one per stage; the DAG one job with both.
    jobs = {name: fig["repeats"][0]["jobs"] for name, fig in saved["systems"].items()}
    assert [j["stages"] for j in jobs["dag"]] == [list(STAGES)]
    assert [j["stages"] for j in jobs["back_to_back"]] == [[s] for s in STAGES]
    for name, js in jobs.items():
        for job in js:
            assert (job["rows_run"], job["rows_ok"], job["rows_error"]) == (ROWS, ROWS, 0), (name, job)
    assert saved["every_row_processed"] == {"dag": True, "back_to_back": True}
    assert saved["dag_stage_counts"] == {
        s: {"rows_in": ROWS, "rows_ok": ROWS, "rows_error": 0} for s in STAGES
    }

    assert saved["agreement_dag_vs_back_to_back"] == {s: 1.0 for s in STAGES}
    for key in ("rows_per_s_dag_over_b2b", "wall_s_dag_over_b2b"):
        assert saved["ratios"][key] > 0, key
    table = format_table(saved)
    assert "back_to_back" in table and "DAG / back-to-back" in table


def test_reviews_dag_spec_binds_as_a_chain_and_fan_out(tmp_path: Path) -> None:
    """bench.dag_reviews' job is a valid 3-stage DAG: the summary classifier reads the summary's text."""
    from bench.dag_reviews import DagReviewsConfig, job_spec
    from pipeline.bind import bind
    from pipeline.spec import parse_spec

    spec = job_spec(
        DagReviewsConfig(),
        input_path=tmp_path / "in.parquet",
        smollm2=tmp_path / "smollm2",
        classifier=tmp_path / "cls",
        out=tmp_path / "out",
    )
    job = bind(parse_spec(spec))
    assert [s.name for s in job.stages] == ["summary", "review_sentiment", "summary_sentiment"]
    sources = {s.name: [(src.stage, src.field or src.column) for _, src in s.inputs] for s in job.stages}
    assert sources["review_sentiment"] == [(None, "text")]
    assert sources["summary_sentiment"] == [("summary", "generated_text")]
    assert dict(job.keep_columns) == {"id": "id", "label": "gold_label"}


def test_reviews_scores_count_agreement_and_accuracy() -> None:
    from bench.dag_reviews import summarize_rows

    def row(gold: object, review: str, summary: str, text: str = "a fine film") -> dict[str, object]:
        return {
            "gold_label": gold,
            "review_sentiment.label": review,
            "summary_sentiment.label": summary,
            "summary.generated_text": text,
            "summary.finish_reason": "stop",
        }

    rows = [
        row("pos", "pos", "pos"),
        row("neg", "pos", "neg"),
        row(1, "pos", "neg", ""),
        row(0, "neg", "neg"),
    ]
    scores = summarize_rows(rows, id2label={0: "neg", 1: "pos"})
    assert scores["agreement_review_vs_summary"] == 0.5
    assert scores["accuracy_review"] == 0.75  # rows 0, 2 (gold id 1 → pos), 3
    assert scores["accuracy_summary"] == 0.75  # rows 0, 1, 3
    assert scores["summaries_empty"] == 1
    assert scores["labels_gold"] == {"pos": 2, "neg": 2}
