"""summarization and translation (removed from the transformers 5 pipelines): parity with the reference the
issue names — `model.generate` + `batch_decode` with the same generation params, one row at a time — on
tiny random BART, T5 and Marian; the 4.x defaults (T5 task prefixes and task_specific_params, pipeline
defaults); truncation and error records; one Ray job per task; seq2seq fine-tuning in-process (falling
loss; the Trainable's saved folder runs through the translation task)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.registry import ROW_ID, RowError, get_task, model_inputs
from pipeline.batching import run_micro_batches
from pipeline.errors import SpecError
from tests.helpers import make_texts
from tests.models.gen_helpers import make_seq2seq


@pytest.fixture(scope="session")
def bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_seq2seq(tmp_path_factory.mktemp("bart"), arch="bart")


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_seq2seq(tmp_path_factory.mktemp("t5"), arch="t5")


@pytest.fixture(scope="session")
def trainable_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Models to fine-tune: the usual small init (0.02) rather than the peaky one the parity tests use."""
    root = tmp_path_factory.mktemp("s2s-train")
    return {
        arch: make_seq2seq(root / arch, arch=arch, hidden=64, init_range=0.02) for arch in ("bart", "marian")
    }


@pytest.fixture(scope="session")
def marian_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_seq2seq(tmp_path_factory.mktemp("marian"), arch="marian")


def _run(
    task_name: str, model_dir: Path, params: dict[str, Any], texts: list[Any], *, batch_size: int = 6
) -> list[Any]:
    """Preprocess → length-sorted micro-batches (the engine's batching) → postprocess, in this process."""
    task = get_task(task_name)
    p = task.parse_params(params, key="params")
    pre = task.load_preprocessor(str(model_dir), p)
    runner = task.load_runner(str(model_dir), p, device="cpu", dtype="float32")
    post = task.load_postprocessor(str(model_dir), p)
    feats = pre({"text": texts, ROW_ID: [str(i) for i in range(len(texts))]})
    ok = [i for i, f in enumerate(feats) if not isinstance(f, RowError)]
    rows = [feats[i] for i in ok]
    res = run_micro_batches(runner.forward, rows, [runner.length(r) for r in rows], batch_size=batch_size)
    assert res.errors == [None] * len(rows)
    out: list[Any] = list(feats)
    for j, i in enumerate(ok):
        out[i] = post(res.outputs[j], inputs={}, features={})
    return out


def _reference(
    model_dir: Path, texts: list[str], *, prefix: str, max_input: int = 128, **generate: Any
) -> list[str]:
    """The issue's reference: generate + batch_decode per row, with the same params."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    out = []
    for text in texts:
        enc = tok([prefix + text], return_tensors="pt", truncation=True, max_length=max_input)
        enc.pop("token_type_ids", None)
        with torch.no_grad():
            ids = model.generate(**enc, **generate)
        out.append(tok.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0])
    return out


def _texts() -> list[str]:
    # Mixed lengths, and one longer than the models' 128 positions (truncated, as the reference is).
    return make_texts(9, seed=3, min_words=1, max_words=50) + [
        " ".join(make_texts(1, seed=4, min_words=150, max_words=150))
    ]


@pytest.mark.parametrize(
    ("arch", "task", "params"),
    [
        (
            "bart",
            "summarization",
            {"num_beams": 3, "max_new_tokens": 9, "min_length": 4, "length_penalty": 0.5},
        ),
        ("bart", "summarization", {"num_beams": 1, "max_new_tokens": 7, "no_repeat_ngram_size": 2}),
        ("marian", "translation", {"num_beams": 2, "max_new_tokens": 8, "early_stopping": True}),
    ],
    ids=["bart-beams", "bart-greedy-norepeat", "marian-beams"],
)
def test_parity_with_generate_reference(
    arch: str, task: str, params: dict[str, Any], bart_dir, marian_dir
) -> None:
    model_dir = bart_dir if arch == "bart" else marian_dir
    texts = _texts()
    got = _run(task, model_dir, params, texts)
    field = "summary_text" if task == "summarization" else "translation_text"
    assert [g[field] for g in got] == _reference(model_dir, texts, prefix="", **params)
    assert len({g[field] for g in got}) > 1


def test_t5_prefixes_and_task_defaults(t5_dir: Path) -> None:
    """T5: the task's `task_specific_params` give the prefix and the generation defaults (as the 4.x
    pipeline applied them); explicit params win; translation picks the entry of src_lang/tgt_lang."""
    texts = _texts()[:8]
    summaries = _run("summarization", t5_dir, {}, texts)
    expected = _reference(
        t5_dir,
        texts,
        prefix="summarize: ",
        early_stopping=True,
        length_penalty=2.0,
        max_length=12,
        min_length=3,
        no_repeat_ngram_size=3,
        num_beams=2,
    )
    assert [s["summary_text"] for s in summaries] == expected
    de = _run("translation", t5_dir, {"num_beams": 1}, texts)  # no languages: the first translation_* entry
    assert [t["translation_text"] for t in de] == _reference(
        t5_dir, texts, prefix="translate English to German: ", early_stopping=True, max_length=10, num_beams=1
    )
    fr = _run("translation", t5_dir, {"src_lang": "en", "tgt_lang": "fr", "max_new_tokens": 5}, texts)
    assert [t["translation_text"] for t in fr] == _reference(
        t5_dir,
        texts,
        prefix="translate English to French: ",
        early_stopping=True,
        max_length=10,
        num_beams=2,
        max_new_tokens=5,
    )


def test_defaults_without_task_params_are_the_pipeline_defaults(bart_dir: Path) -> None:
    from models import seq2seq

    p = get_task("summarization").parse_params({}, key="params")
    pre = seq2seq.load_preprocessor(str(bart_dir), "summarization", p)
    assert pre.settings.generate_kwargs == {"max_new_tokens": 256, "num_beams": 4}
    assert pre.settings.prefix == ""


def test_bad_rows_truncation_and_params(bart_dir: Path) -> None:
    task = get_task("summarization")
    p = task.parse_params({"truncation": False}, key="params")
    pre = task.load_preprocessor(str(bart_dir), p)
    feats = pre({"text": ["fine", None, 3, " ".join(["movie"] * 300)], ROW_ID: list("abcd")})
    assert not isinstance(feats[0], RowError)
    assert [f.error_type for f in feats[1:]] == ["InvalidInput", "InvalidInput", "InputTooLong"]
    truncating = task.load_preprocessor(str(bart_dir), task.parse_params({}, key="params"))
    assert len(truncating({"text": [" ".join(["movie"] * 300)], ROW_ID: ["a"]})[0]["input_ids"]) == 128
    for bad, key in (
        ({"num_beams": 0}, "params.num_beams"),
        ({"max_new_tokens": 0}, "params.max_new_tokens"),
        ({"beams": 2}, "params.beams"),
    ):
        with pytest.raises(SpecError) as e:
            task.parse_params(bad, key="params")
        assert e.value.key == key
    with pytest.raises(SpecError) as e:
        get_task("translation").parse_params({"src_lang": "en"}, key="params")
    assert e.value.key == "params.tgt_lang"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("task", ["summarization", "translation"])
def test_job_parity_and_error_records(
    ray_session, task: str, bart_dir: Path, marian_dir: Path, tmp_path: Path
) -> None:
    from pipeline.commit import read_errors, read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec

    model_dir = bart_dir if task == "summarization" else marian_dir
    texts: list[Any] = make_texts(60, seed=8, min_words=1, max_words=60)
    texts[7] = None
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(60)), "doc": pa.array(texts, pa.string())}), path)
    params = {"num_beams": 2, "max_new_tokens": 6}
    spec = parse_spec(
        {
            "name": task,
            "input": {"uri": str(path), "id_column": "id", "shard_rows": 25},
            "stages": [
                {
                    "name": "s",
                    "task": task,
                    "model": str(model_dir),
                    "inputs": {"text": "doc"},
                    "params": params,
                    "batch_size": 8,
                }
            ],
            "output": {"uri": str(tmp_path / "out")},
            "max_error_rate": 0.05,
        }
    )
    result = run_inference(spec, progress=False)
    assert (result.rows_ok, result.rows_error) == (59, 1)
    assert [(e["id"], e["error_type"]) for e in read_errors(str(tmp_path / "out")).to_pylist()] == [
        (7, "InvalidInput")
    ]
    rows = read_output(str(tmp_path / "out")).sort_by("id").to_pylist()
    field = "summary_text" if task == "summarization" else "translation_text"
    ok = [t for t in texts if t is not None]
    assert [r[field] for r in rows] == _reference(model_dir, ok, prefix="", **params)


# --- fine-tuning ------------------------------------------------------------------------------------------


def test_seq2seq_loss_falls(trainable_dirs: dict[str, Path]) -> None:
    import torch

    torch.manual_seed(0)
    base = str(trainable_dirs["bart"])
    trainable = get_task("summarization").training(base, label_names=(), max_length=64, options={})
    model = trainable.build_model(base)
    texts = make_texts(8, seed=13, min_words=5, max_words=25)
    targets = [" ".join(t.split()[:3]) for t in texts]  # "summary" = the first three words
    batch = trainable.encode({"text": texts}, targets)
    pad = trainable.tokenizer.pad_token_id
    assert not (batch["labels"] == pad).any() and (batch["labels"] == -100).any()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**model_inputs(trainable.encode({"text": texts}, targets))).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    model.eval()
    with torch.no_grad():  # the epoch's task metrics: greedy generation on the eval batch, then ROUGE
        pairs = trainable.eval_predictions(None, batch, model=model)
    assert [ref for _, ref in pairs] == targets
    metrics = trainable.eval_metrics(pairs)
    assert 0.0 <= metrics["eval_rouge2"] <= metrics["eval_rouge1"] <= 1.0 and metrics["eval_rougeL"] > 0.2, (
        metrics
    )
    with pytest.raises(ValueError, match="target text"):
        trainable.encode({"text": texts[:1]}, [None])


def test_finetuned_folder_runs_in_inference(trainable_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The Trainable's saved folder is what the translation task loads: trained on one target sentence for
    every source, it then translates unseen sources to that sentence (the random base model does not).
    (The Ray Train path, `run_finetune` → inference job, is exercised once for the family, in
    test_text_generation.py.)"""
    import torch

    torch.manual_seed(0)
    base = str(trainable_dirs["marian"])
    task = get_task("translation")
    trainable = task.training(base, label_names=(), max_length=32, options={"max_target_length": 16})
    model = trainable.build_model(base)
    sources = make_texts(64, seed=14, min_words=2, max_words=12)
    target = "the film was great"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(24):
        batch = sources[(step % 8) * 8 : (step % 8 + 1) * 8]
        model(**model_inputs(trainable.encode({"text": batch}, [target] * len(batch)))).loss.backward()
        opt.step()
        opt.zero_grad()
    trainable.save(model.eval(), str(tmp_path / "model"))
    unseen = make_texts(6, seed=15, min_words=2, max_words=12)
    params = {"num_beams": 1, "max_new_tokens": 12}
    got = [r["translation_text"] for r in _run("translation", tmp_path / "model", params, unseen)]
    assert sum(g.strip() == target for g in got) >= 5, got
    before = [r["translation_text"] for r in _run("translation", trainable_dirs["marian"], params, unseen)]
    assert not any(b.strip() == target for b in before)
