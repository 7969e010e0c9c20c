"""`shardwise report` and `shardwise preview`, rendered in headless Chromium and checked for what a person
sees: the page loads without errors and without the network, its plots and images are there and not empty,
and known predictions (a box label, an entity span, a predicted label, an answer, a transcript) are on it.

One set of real jobs (tests/report/jobs.py) over tiny models feeds every test; each rendered page leaves a
screenshot in tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobs.cli import main
from pipeline.commit import read_errors, read_output
from tests.report import jobs

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def outputs(ray_session, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("see")
    failed, partial = jobs.failed_and_partial_jobs(root)
    interrupted = root / "interrupted-out"
    shutil.copytree(partial, interrupted)
    jobs.interrupt(interrupted)
    text = jobs.text_job(root)
    # The same output twice more: once without runtime metrics (an older output), once with a run's metrics
    # written in the documented format (the metrics writer may or may not have written its own).
    plain = root / "text-plain"
    shutil.copytree(text, plain)
    shutil.rmtree(plain / "_metrics" / "runtime", ignore_errors=True)
    timed = root / "text-timed"
    shutil.copytree(plain, timed)
    jobs.write_runtime_metrics(timed, ["gen", "sentiment", "ents", "qa", "summary"])
    return {
        "text": text,
        "plain": plain,
        "timed": timed,
        "vision": jobs.vision_job(root),
        "audio": jobs.audio_job(root),
        "failed": failed,
        "partial": partial,
        "interrupted": interrupted,
    }


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _report(capsys, tmp_path: Path, output: Path, name: str) -> Path:
    target = tmp_path / f"{name}.html"
    code, out, err = _cli(capsys, "report", str(output), "-o", str(target))
    assert code == 0, err
    assert str(target) in out
    return target


def _plots(page) -> dict[str, dict[str, float]]:
    """Every inline SVG plot: its title → its size on the page and how many drawn elements it holds."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('.plot svg')].map(svg => {
            const r = svg.getBoundingClientRect();
            const title = [...svg.querySelectorAll('text')].map(t => t.textContent).find(t => t.includes(':') || t.includes(' ')) || '';
            return [title, {w: r.width, h: r.height, drawn: svg.querySelectorAll('path, rect, use').length}];
        }))"""
    )


def _titles(page) -> list[str]:
    return page.evaluate(
        "() => [...document.querySelectorAll('.plot svg')].map(s => [...s.querySelectorAll('text')].map(t => t.textContent).join(' | '))"
    )


def _has_plot(titles: list[str], title: str) -> bool:
    return any(title in t for t in titles)


def _check_plots(page, n_expected: int) -> list[str]:
    titles = _titles(page)
    assert len(titles) == n_expected, titles
    sizes = page.evaluate(
        "() => [...document.querySelectorAll('.plot svg')].map(s => { const r = s.getBoundingClientRect(); return [r.width, r.height, s.querySelectorAll('path, rect, use').length]; })"
    )
    for w, h, drawn in sizes:
        assert w > 100 and h > 50 and drawn > 3, sizes
    return titles


# --- report -------------------------------------------------------------------------------------------------


def test_report_of_a_multi_stage_job_shows_counts_errors_and_distributions(outputs, render, capsys, tmp_path):
    """No runtime metrics in this output: the section says so. The rest: the summary, rows per stage, the
    error breakdown with the two errors (a null text in the first stage, a too-long prompt in `gen`), and
    each stage's distributions, with a predicted label and entity type drawn as text."""
    path = _report(capsys, tmp_path, outputs["plain"], "report-text")
    shown = render(path, "report-text.png")
    page = shown.page
    assert shown.errors == []
    body = page.inner_text("body")
    assert "succeeded" in page.inner_text("b.state-succeeded")
    assert "No runtime metrics recorded for this run." in body
    for stage in ("gen", "sentiment", "ents", "qa", "summary"):
        assert f"stage {stage} (" in body
    errors = read_errors(str(outputs["plain"])).to_pylist()
    assert {e["id"]: (e["stage"], e["step"]) for e in errors} == {
        jobs.NULL_ROW: ("gen", "preprocess"),
        jobs.LONG_ROW: ("gen", "preprocess"),
    }
    assert "InputTooLong" in body
    for e in errors:  # every error's type and stage is in the breakdown table
        assert e["error_type"] in body and e["stage"] in body
    preds = read_output(str(outputs["plain"]), flat=True).to_pylist()
    titles = _check_plots(page, 13)
    for title in (
        "rows per stage",
        "error records by stage / step / type",
        "gen: finish reason",
        "gen: generated tokens",
        "sentiment: predicted label",
        "sentiment: score of the predicted label",
        "ents: entities per row",
        "qa: answer score",
        "summary: summary length (words)",
    ):
        assert _has_plot(titles, title), (title, titles)
    labels = {p["sentiment.label"] for p in preds}
    label_plot = next(t for t in titles if "sentiment: predicted label" in t)
    assert all(label in label_plot for label in labels)  # each predicted label is a bar's name
    entity_types = {e["entity_group"] for p in preds for e in p["ents.entities"] or []}
    if entity_types:
        assert any(all(t in title for t in entity_types) for title in titles if "ents: entity type" in title)


def test_report_draws_runtime_plots_from_the_metrics_files(outputs, render, capsys, tmp_path):
    path = _report(capsys, tmp_path, outputs["timed"], "report-runtime")
    shown = render(path, "report-runtime.png")
    assert shown.errors == []
    body = shown.page.inner_text("body")
    assert "No runtime metrics recorded" not in body
    titles = _check_plots(shown.page, 13 + 5)
    for title in (
        "throughput over time",
        "micro-batch latency (forward)",
        "replica utilisation (busy share)",
        "padding efficiency (real / padded)",
        "rows waiting for each stage's replicas",
    ):
        assert _has_plot(titles, title), (title, titles)
    summary = json.loads(next((outputs["timed"] / "_metrics" / "runtime").glob("*/summary.json")).read_text())
    # the per-stage table carries the summary's figures
    eff = summary["stages"]["gen"]["forward"]["padding_efficiency"]
    assert f"{eff:.4g}" in body
    assert "first shard committed after s" in body


@pytest.mark.parametrize(
    "which,state", [("failed", "failed"), ("partial", "partial"), ("interrupted", "interrupted")]
)
def test_report_of_failed_partial_and_interrupted_jobs(outputs, render, capsys, tmp_path, which, state):
    path = _report(capsys, tmp_path, outputs[which], f"report-{which}")
    shown = render(path, f"report-{which}.png")
    assert shown.errors == []
    assert shown.page.inner_text(f"b.state-{state}") == state
    body = shown.page.inner_text("body")
    if which == "failed":
        assert "reason" in body and "error" in body.lower()
        assert "InvalidInput" in body or "error record" in body
    else:
        assert "shards\t1/3 committed" in body or "1/3 committed" in body


def test_report_and_preview_refuse_a_folder_that_is_not_an_output(capsys, tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"not shardwise")
    for command in ("report", "preview"):
        code, out, err = _cli(capsys, command, str(tmp_path), "-o", str(tmp_path / "x.html"))
        assert code == 2
        assert "not a shardwise output" in err and "Traceback" not in err
        code, out, err = _cli(capsys, command, str(tmp_path / "missing"), "-o", str(tmp_path / "x.html"))
        assert code == 2 and "does not exist" in err
    assert not (tmp_path / "x.html").exists()
    code, out, err = _cli(capsys, "report", str(tmp_path), "--storage-options", "{nope")
    assert code == 2 and "--storage-options" in err


# --- preview ------------------------------------------------------------------------------------------------


def _preview(capsys, tmp_path: Path, output: Path, name: str, *args: str) -> Path:
    target = tmp_path / f"{name}.html"
    code, out, err = _cli(capsys, "preview", str(output), "-o", str(target), *args)
    assert code == 0, err
    return target


def _as_parsed(text: str) -> str:
    """`text` as the DOM holds it after HTML parsing (CR and CRLF become LF)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _card(page, row_id: Any):
    return page.locator(f'.row[data-id="{row_id}"]')


def _images_loaded(page) -> list[list[float]]:
    return page.evaluate(
        "() => [...document.querySelectorAll('img')].map(i => [i.naturalWidth, i.naturalHeight, i.complete ? 1 : 0])"
    )


def test_preview_of_text_stages_side_by_side(outputs, render, capsys, tmp_path):
    path = _preview(capsys, tmp_path, outputs["text"], "preview-text", "--n", "6")
    shown = render(path, "preview-text.png")
    page = shown.page
    assert shown.errors == []
    preds = read_output(str(outputs["text"])).to_pylist()[:6]
    texts = {i: t for i, t in enumerate(jobs.make_texts(16, seed=5, min_words=4, max_words=12))}
    assert page.locator(".row").count() == 6
    found_entity = False
    for p in preds:
        card = _card(page, p["id"])
        assert card.locator(".stage").count() == 5  # every stage's panel, side by side
        # classifier: the predicted label is the first bar
        assert (
            card.locator('[data-stage="sentiment"] .bar .lab').first.inner_text() == p["sentiment"]["label"]
        )
        # generation beside its source
        gen = card.locator('[data-stage="gen"]')
        assert gen.locator(".generated").text_content() == _as_parsed(p["gen"]["generated_text"])
        assert texts[p["id"]] in gen.locator(".text").first.inner_text()
        # entity spans: each one is marked with its text and type
        marks = card.locator('[data-stage="ents"] mark.ent')
        entities = p["ents"]["entities"] or []
        spans = [(texts[p["id"]][e["start"] : e["end"]], e["entity_group"]) for e in entities]
        shown_spans = [
            (marks.nth(k).locator(".span").inner_text(), marks.nth(k).get_attribute("data-type"))
            for k in range(marks.count())
        ]
        assert shown_spans == spans
        found_entity |= bool(spans)
        # QA: the answer is marked in its context
        qa = card.locator('[data-stage="qa"]')
        if p["qa"]["answer"].strip():
            assert qa.locator("mark.answer").inner_text() == p["qa"]["answer"]
        # summarization beside its source
        assert card.locator('[data-stage="summary"] .generated').text_content() == _as_parsed(
            p["summary"]["summary_text"]
        )
    assert found_entity, "the tiny NER model tagged nothing in the first rows: the span check checked nothing"


def test_preview_of_vision_stages(outputs, render, capsys, tmp_path):
    path = _preview(capsys, tmp_path, outputs["vision"], "preview-vision")
    shown = render(path, "preview-vision.png")
    page = shown.page
    assert shown.errors == []
    preds = read_output(str(outputs["vision"])).to_pylist()
    assert page.locator(".row").count() == len(preds) == 6
    for w, h, complete in _images_loaded(page):
        assert complete and w > 0 and h > 0
    # per row: a detection SVG over the image, a segmentation overlay, image + depth map, classifier image
    assert page.locator("svg.pic image").count() == 6
    assert page.locator("img.depth").count() == 6
    assert page.locator('[data-stage="seg"] img.pic').count() == 6
    first = preds[0]
    card = _card(page, first["id"])
    labels = card.locator("svg.pic text.box-label").all_text_contents()
    assert labels == [f"{o['label']} {o['score']:.2f}" for o in first["det"]["objects"]] and labels
    legend = card.locator('[data-stage="seg"] .legend').inner_text()
    assert all(s["label"] in legend for s in first["seg"]["segments"])
    assert card.locator('[data-stage="kind"] .bar .lab').first.inner_text() == first["kind"]["label"]
    # the overlay is not the plain image: masks were drawn over it
    box = page.locator('[data-stage="seg"] img.pic').first.bounding_box()
    assert box and box["width"] > 50


def test_preview_of_audio_stages_plays_the_input(outputs, render, capsys, tmp_path):
    path = _preview(
        capsys, tmp_path, outputs["audio"], "preview-audio", "--sample", "--n", "3", "--seed", "1"
    )
    shown = render(path, "preview-audio.png")
    page = shown.page
    assert shown.errors == []
    preds = {p["id"]: p for p in read_output(str(outputs["audio"])).to_pylist()}
    cards = page.locator(".row")
    assert cards.count() == 3
    ids = [int(cards.nth(k).get_attribute("data-id")) for k in range(3)]
    assert ids == sorted(int(i) for i in np.random.default_rng(1).choice(4, size=3, replace=False))
    durations = page.evaluate(
        """async () => Promise.all([...document.querySelectorAll('audio')].map(a => new Promise(ok => {
            a.preload = 'metadata'; a.onloadedmetadata = () => ok(a.duration); a.onerror = () => ok(-1); a.load(); })))"""
    )
    assert len(durations) == 6  # one player per stage panel
    for row_id in ids:
        card = _card(page, row_id)
        assert card.locator(".transcript").text_content() == _as_parsed(preds[row_id]["asr"]["text"])
        assert (
            card.locator('[data-stage="intent"] .bar .lab').first.inner_text()
            == preds[row_id]["intent"]["label"]
        )
    expected = [0.6 + 0.2 * i for i in ids for _ in range(2)]
    assert durations == pytest.approx(expected, abs=0.01)


def test_preview_sample_is_seeded(outputs, capsys, tmp_path):
    from jobs.preview import build_preview

    a, _ = build_preview(str(outputs["text"]), n=4, sample=True, seed=3)
    b, _ = build_preview(str(outputs["text"]), n=4, sample=True, seed=3)
    c, _ = build_preview(str(outputs["text"]), n=4, sample=True, seed=4)
    assert a == b and a != c
