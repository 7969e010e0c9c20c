"""question-answering (4.x behaviour; transformers 5 has no pipeline for it): answers known by construction
on a hand-set model, parity with an independent span decoding on a tiny random BERT (windows of a
5,000-word context included), bad rows as error records, one Ray job; fine-tuning loss falls."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest

from models.registry import get_task, model_inputs
from pipeline.errors import SpecError
from tests.helpers import WORDS, make_texts
from tests.models.nlp_helpers import make_qa_model, make_span_qa_model, run_task_in_process

# Filler for the hand-set model's contexts: any word but the two it looks for.
FILLER = [w for w in WORDS if w not in ("brilliant", "ending")]


@pytest.fixture(scope="module")
def qa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qa_model(tmp_path_factory.mktemp("qa"))


@pytest.fixture(scope="module")
def span_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_span_qa_model(tmp_path_factory.mktemp("span-qa"), start_word="brilliant", end_word="ending")


def filler(n: int, *, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(FILLER) for _ in range(n))


def reference_answers(
    model_dir: Path,
    question: str,
    context: str,
    *,
    max_seq_len: int,
    doc_stride: int,
    max_answer_len: int = 15,
    top_k: int = 1,
    handle_impossible_answer: bool = False,
    align_to_words: bool = True,
) -> list[dict[str, Any]]:
    """The standard span decoding, written out plainly: per window, softmax of the start and end logits over
    [CLS] + the context tokens, every (start, end) context pair with start <= end < start + max_answer_len
    scored p(start)·p(end), ranked across windows; character offsets from the offset mapping, widened to
    whole words (WordPiece "##" pieces) when align_to_words."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    enc = tokenizer(
        question,
        context,
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    candidates = []
    null_score = math.inf
    for w in range(len(enc["input_ids"])):
        ids = enc["input_ids"][w]
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor([ids]),
                token_type_ids=torch.tensor([enc["token_type_ids"][w]]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
        ctx = [t for t, s in enumerate(enc.sequence_ids(w)) if s == 1]
        allowed = [0, *ctx]  # [CLS] takes part in the softmax (it is the null answer)
        p_start = dict(
            zip(allowed, torch.softmax(out.start_logits[0, allowed].double(), 0).tolist(), strict=True)
        )
        p_end = dict(
            zip(allowed, torch.softmax(out.end_logits[0, allowed].double(), 0).tolist(), strict=True)
        )
        null_score = min(null_score, p_start[0] * p_end[0])
        tokens = tokenizer.convert_ids_to_tokens(ids)
        offsets = enc["offset_mapping"][w]
        for s in ctx:
            for e in ctx:
                if s <= e < s + max_answer_len:
                    a, b = s, e
                    if align_to_words:
                        while a - 1 in ctx and tokens[a].startswith("##"):
                            a -= 1
                        while b + 1 in ctx and tokens[b + 1].startswith("##"):
                            b += 1
                    start, end = offsets[a][0], offsets[b][1]
                    candidates.append(
                        {
                            "answer": context[start:end],
                            "score": p_start[s] * p_end[e],
                            "start": start,
                            "end": end,
                        }
                    )
    if handle_impossible_answer:
        candidates.append({"answer": "", "score": null_score, "start": 0, "end": 0})
    return sorted(candidates, key=lambda c: -c["score"])[:top_k]


def assert_same_answers(got: dict[str, Any], expected: list[dict[str, Any]], top_k: int) -> None:
    best = expected[0]
    assert (got["answer"], got["start"], got["end"]) == (best["answer"], best["start"], best["end"])
    assert got["score"] == pytest.approx(best["score"], abs=1e-4)
    if top_k > 1:
        assert [(a["answer"], a["start"], a["end"]) for a in got["answers"]] == [
            (a["answer"], a["start"], a["end"]) for a in expected
        ]
        assert [a["score"] for a in got["answers"]] == pytest.approx([a["score"] for a in expected], abs=1e-4)
    else:
        assert "answers" not in got


# --- answers known by construction ------------------------------------------------------------------------


def test_known_answers_on_a_hand_set_model(span_model) -> None:
    contexts = [
        "the plot was slow but the brilliant cast and a charming ending saved it",
        "Brilliant, from start to ENDING!",
        "the plot was slow and the music was dull",  # neither word: no answer
    ]
    questions = ["what saved it?", "how was it?", "what was good?"]
    got = run_task_in_process(
        "question-answering", span_model, {}, {"question": questions, "context": contexts}
    )
    assert got[0]["answer"] == "brilliant cast and a charming ending"
    assert got[1]["answer"] == "Brilliant, from start to ENDING"  # original case and punctuation
    for row, context in zip(got, contexts, strict=True):
        assert row["answer"] == context[row["start"] : row["end"]]
    assert got[0]["score"] > 0.9 and got[1]["score"] > 0.9
    assert got[2]["answer"] != "" and got[2]["score"] < 0.05  # a span is forced when null is not allowed

    got = run_task_in_process(
        "question-answering",
        span_model,
        {"handle_impossible_answer": True, "top_k": 2},
        {"question": questions, "context": contexts},
    )
    assert got[0]["answer"] == "brilliant cast and a charming ending"
    assert got[0]["answers"][1]["score"] < 0.01
    assert (got[2]["answer"], got[2]["start"], got[2]["end"]) == ("", 0, 0)
    assert got[2]["score"] > 0.9 and got[2]["answers"][1]["answer"] != ""

    # The 6-token answer is too long for max_answer_len=5: the answer changes to a shorter span.
    [short] = run_task_in_process(
        "question-answering",
        span_model,
        {"max_answer_len": 5},
        {"question": [questions[0]], "context": [contexts[0]]},
    )
    assert short["answer"] != contexts[0][26:62] and len(short["answer"].split()) <= 5
    assert short["score"] < 0.01


def test_known_answer_deep_in_a_long_context_is_found_across_windows(span_model) -> None:
    before, after = filler(1500, seed=1), filler(700, seed=2)
    context = f"{before} a brilliant score and a moving ending, {after}"
    params = {"max_seq_len": 64, "doc_stride": 16}
    [row] = run_task_in_process(
        "question-answering", span_model, params, {"question": ["why?"], "context": [context]}
    )
    start = context.index("brilliant")
    assert (row["answer"], row["start"], row["end"]) == (
        "brilliant score and a moving ending",
        start,
        start + 35,
    )
    assert row["score"] > 0.9


# --- parity with the reference decoding ----------------------------------------------------------------

PARAM_SETS = [
    {"max_seq_len": 48, "doc_stride": 12},
    {"max_seq_len": 64, "doc_stride": 20, "top_k": 3, "max_answer_len": 4, "align_to_words": False},
    {"max_seq_len": 40, "doc_stride": 8, "top_k": 2, "handle_impossible_answer": True},
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("params", PARAM_SETS, ids=["default-align", "top3-len4-offsets", "impossible"])
def test_parity_with_reference_span_decoding(qa_model, params) -> None:
    questions = make_texts(12, seed=5, min_words=2, max_words=8)
    # Short and windowed contexts (up to ~4 windows), with punctuation and sub-word pieces.
    contexts = make_texts(12, seed=6, min_words=3, max_words=90)
    contexts[0] = "Brilliant!! Spielberg's film, (the) boringly-slow ending..."
    got = run_task_in_process(
        "question-answering", qa_model, params, {"question": questions, "context": contexts}
    )
    top_k = params.get("top_k", 1)
    for q, c, row in zip(questions, contexts, got, strict=True):
        expected = reference_answers(qa_model, q, c, **params)
        assert_same_answers(row, expected, top_k)
        assert row["answer"] == c[row["start"] : row["end"]]


def test_bad_inputs_are_row_errors(qa_model) -> None:
    questions = [None, "what?", 7, "", "what?", "  ", "why " * 200]
    contexts = ["ok", None, "ok", "ok", "", "ok", "a good film"]
    got = run_task_in_process(
        "question-answering", qa_model, {}, {"question": questions, "context": contexts}
    )
    kinds = [row[0] if isinstance(row, tuple) else "ok" for row in got]
    # The long question is cut to max_question_len (64 tokens); the default doc_stride (64) is lowered to
    # fit the 61 context tokens left in the model's 128.
    assert kinds == ["InvalidInput"] * 6 + ["ok"]
    assert "null" in got[0][1] and "'context'" in got[1][1] and "int" in got[2][1] and "empty" in got[3][1]
    # A question that leaves no room for the context in a window is an error, not a crash.
    [row] = run_task_in_process(
        "question-answering",
        qa_model,
        {"max_seq_len": 48, "doc_stride": 8, "max_question_len": 40},
        {"question": ["why " * 60], "context": ["a good film"]},
    )
    assert row[0] == "InputTooLong" and "max_question_len" in row[1]


def test_params_are_validated_with_their_keys(qa_model) -> None:
    task = get_task("question-answering")
    for params, key in [
        ({"top_k": 0}, "p.top_k"),
        ({"max_answer_len": 0}, "p.max_answer_len"),
        ({"doc_stride": 64, "max_seq_len": 64}, "p.doc_stride"),
        ({"max_seq_len": "long"}, "p.max_seq_len"),
        ({"topk": 2}, "p.topk"),
    ]:
        with pytest.raises(SpecError) as info:
            task.parse_params(params, key="p")
        assert info.value.key == key
    # The model takes 128 positions.
    with pytest.raises(SpecError, match="at most 128"):
        task.load_preprocessor(str(qa_model), task.parse_params({"max_seq_len": 384}, key="p"))
    assert task.output_schema(task.parse_params({}, key="p")).names == ["answer", "score", "start", "end"]
    assert "answers" in task.output_schema(task.parse_params({"top_k": 2}, key="p")).names


@pytest.mark.timeout(240)
def test_inference_job_5000_word_context_parity_and_error_records(ray_session, qa_model, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.commit import read_errors, read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec
    from tests.helpers import job_dict

    long_context = make_texts(1, seed=9, min_words=5000, max_words=5000)[0]
    questions: list[Any] = make_texts(16, seed=7, min_words=2, max_words=10)
    contexts: list[Any] = make_texts(16, seed=8, min_words=5, max_words=300)
    contexts[0] = long_context
    questions += [None, "what?", "", "what?"]
    contexts += ["a good film", None, "a good film", ""]
    pq.write_table(
        pa.table({"id": list(range(len(questions))), "q": questions, "ctx": contexts}),
        tmp_path / "in.parquet",
    )
    params = {"max_seq_len": 128, "doc_stride": 32, "top_k": 2}
    spec = parse_spec(
        job_dict(
            input_uri=str(tmp_path / "in.parquet"),
            output_uri=str(tmp_path / "out"),
            model=str(qa_model),
            task="question-answering",
            max_error_rate=0.25,
            stages=[
                {
                    "name": "qa",
                    "task": "question-answering",
                    "model": str(qa_model),
                    "inputs": {"question": "q", "context": "ctx"},
                    "params": params,
                    "batch_size": 4,
                }
            ],
        )
    )
    result = run_inference(spec, progress=False)
    assert (result.rows_ok, result.rows_error) == (16, 4)
    errors = read_errors(str(tmp_path / "out")).to_pylist()
    assert sorted(int(e["id"]) for e in errors) == [16, 17, 18, 19]
    assert {e["error_type"] for e in errors} == {"InvalidInput"}
    rows = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert set(rows) == set(range(16))
    for i in range(16):
        expected = reference_answers(qa_model, questions[i], contexts[i], **params)
        assert_same_answers(rows[i], expected, top_k=2)
    assert rows[0]["answer"] == long_context[rows[0]["start"] : rows[0]["end"]]


# --- fine-tuning -------------------------------------------------------------------------------------------


def squad_rows(n: int, *, seed: int) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Contexts with one 'brilliant <word> ending' phrase somewhere (the answer), some longer than a window."""
    rng = random.Random(seed)
    questions, contexts, answers = [], [], []
    for i in range(n):
        before = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 30)))
        after = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 30)))
        phrase = f"brilliant {rng.choice(FILLER)} ending"
        context = f"{before} {phrase} {after}".strip()
        questions.append("what was brilliant?")
        contexts.append(context)
        if i % 5 == 4:  # SQuAD 2.0 style: no answer
            answers.append({"text": [], "answer_start": []})
        else:
            answers.append({"text": [phrase], "answer_start": [context.index(phrase)]})
    return questions, contexts, answers


def test_answers_become_positions_in_every_window(qa_model) -> None:
    task = get_task("question-answering")
    trainable = task.training(str(qa_model), label_names=(), max_length=32, options={"doc_stride": 8})
    context = filler(40, seed=3) + " brilliant acting ending " + filler(10, seed=4)
    start = context.index("brilliant acting ending")
    answer = {"text": ["brilliant acting ending"], "answer_start": [start]}
    batch = trainable.encode({"question": ["what?"], "context": [context]}, [answer])
    windows = batch["input_ids"].shape[0]
    assert windows > 2
    tokenizer = trainable.tokenizer
    inside = 0
    for w in range(windows):
        s, e = int(batch["start_positions"][w]), int(batch["end_positions"][w])
        if (s, e) == (0, 0):
            continue
        inside += 1
        assert tokenizer.decode(batch["input_ids"][w][s : e + 1]) == "brilliant acting ending"
    assert inside >= 1
    with pytest.raises(ValueError, match="is not at character 3"):
        trainable.encode(
            {"question": ["q"], "context": ["a good film"]}, [{"text": "bad", "answer_start": 3}]
        )


def test_training_loss_falls_in_process(qa_model) -> None:
    import torch

    torch.manual_seed(0)
    task = get_task("question-answering")
    trainable = task.training(str(qa_model), label_names=(), max_length=48, options={})
    model = trainable.build_model(str(qa_model)).train()
    questions, contexts, answers = squad_rows(16, seed=0)
    batch = trainable.encode({"question": questions, "context": contexts}, answers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(**model_inputs(batch))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    hits, total = trainable.eval_counts(out, batch)
    assert total == batch["input_ids"].shape[0] and hits / total > 0.5
    # The epoch's task metrics: answer text from the windows' spans (the inference search) vs the gold texts
    pairs = trainable.eval_predictions(out, batch, model=model)
    assert len(pairs) == len(questions) and all(
        p["answer"] in c for (p, _), c in zip(pairs, contexts, strict=True)
    )
    metrics = trainable.eval_metrics(pairs)
    assert 0.0 <= metrics["eval_exact_match"] <= metrics["eval_f1"] <= 1.0 and metrics["eval_f1"] > 0.3, (
        metrics
    )
