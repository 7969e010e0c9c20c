"""token-classification: parity with `transformers.pipeline("token-classification")` on a tiny random BERT
for every aggregation strategy, ignore_labels and long texts with `stride`; bad rows become error
records; one Ray job end to end. Fine-tuning: word tags aligned to sub-tokens, loss falls, and a
`run_finetune` whose output runs in an inference job."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.registry import get_task, model_inputs
from pipeline.errors import SpecError
from tests.helpers import WORDS, make_texts
from tests.models.nlp_helpers import NER_LABELS, make_token_classifier, run_task_in_process

STRATEGIES = ("none", "simple", "first", "average", "max")

# Short and truncated (>128 tokens) texts, punctuation, case, sub-words, unknown characters, whitespace.
TEXTS = make_texts(14, seed=3, max_words=150) + [
    "",
    "   ",
    "Brilliant!! Spielberg's film, (the) ending-was DULL...",
    "Ünïcode café — naïve 東京 ✓ movie",
    "scriptdirectorcast actingacting unbelievably-long-hyphenated words",
    "the\tmovie\nwas   great",
]


@pytest.fixture(scope="module")
def ner_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_token_classifier(tmp_path_factory.mktemp("ner"))


@pytest.fixture(scope="module")
def pipe(ner_model: Path) -> Any:
    from transformers import pipeline

    return pipeline("token-classification", model=str(ner_model), device="cpu")


@pytest.fixture(scope="module")
def long_text() -> str:
    text = make_texts(1, seed=9, min_words=2000, max_words=2000)[0]
    assert len(text.split()) == 2000
    return text


def assert_same_entities(got: list[dict[str, Any]], expected: list[dict[str, Any]], strategy: str) -> None:
    """Same labels, words, offsets (and token indexes) in the same order; scores within 1e-4."""
    label = "entity" if strategy == "none" else "entity_group"
    keys = (label, "word", "start", "end") + (("index",) if strategy == "none" else ())
    assert [tuple(g[k] for k in keys) for g in got] == [tuple(e[k] for k in keys) for e in expected]
    assert [g["score"] for g in got] == pytest.approx([float(e["score"]) for e in expected], abs=1e-4)
    # Exactly the pipeline's keys: the output struct is picked by the strategy.
    for g, e in zip(got, expected, strict=True):
        assert set(g) == set(e)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_parity_with_pipeline_for_every_aggregation_strategy(ner_model, pipe, strategy) -> None:
    got = run_task_in_process(
        "token-classification", ner_model, {"aggregation_strategy": strategy}, {"text": TEXTS}
    )
    expected = pipe(TEXTS, aggregation_strategy=strategy)
    assert sum(len(e) for e in expected) > 200  # a random 5-label model tags most tokens: a real check
    for text, row, exp in zip(TEXTS, got, expected, strict=True):
        assert isinstance(row, dict), row
        assert_same_entities(row["entities"], exp, strategy)
        for e in row["entities"]:
            assert 0 <= e["start"] < e["end"] <= len(text)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["none", "average"])
def test_ignore_labels_parity(ner_model, pipe, strategy) -> None:
    ignore = ["O", "I-LOC", "B-PER"]
    got = run_task_in_process(
        "token-classification",
        ner_model,
        {"aggregation_strategy": strategy, "ignore_labels": ignore},
        {"text": TEXTS},
    )
    expected = pipe(TEXTS, aggregation_strategy=strategy, ignore_labels=ignore)
    label = "entity" if strategy == "none" else "entity_group"
    assert all(e[label] not in ignore for row in got for e in row["entities"])
    for row, exp in zip(got, expected, strict=True):
        assert_same_entities(row["entities"], exp, strategy)
    # Nothing ignored: "O" shows up too.
    everything = run_task_in_process(
        "token-classification",
        ner_model,
        {"aggregation_strategy": "none", "ignore_labels": []},
        {"text": TEXTS},
    )
    assert {e["entity"] for row in everything for e in row["entities"]} == set(NER_LABELS)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("strategy", "stride"), [("simple", 16), ("average", 0)])
def test_2000_word_text_with_stride_matches_pipeline(ner_model, pipe, long_text, strategy, stride) -> None:
    params = {"aggregation_strategy": strategy, "stride": stride}
    [row] = run_task_in_process("token-classification", ner_model, params, {"text": [long_text]})
    expected = pipe(long_text, aggregation_strategy=strategy, stride=stride)
    assert_same_entities(row["entities"], expected, strategy)
    # Entities reach the end of the text: it was windowed, not truncated at 128 tokens.
    assert row["entities"][-1]["end"] > len(long_text) - 20


def test_bad_inputs_are_row_errors_and_empty_text_has_no_entities(ner_model) -> None:
    values = [None, 5, ["a", "list"], "a fine text", ""]
    got = run_task_in_process("token-classification", ner_model, {}, {"text": values})
    for row in got[:3]:
        assert isinstance(row, tuple) and row[0] == "InvalidInput"
    assert "null" in got[0][1] and "int" in got[1][1] and "list" in got[2][1]
    assert len(got[3]["entities"]) > 0
    assert got[4] == {"entities": []}


def test_params_are_validated_with_their_keys(ner_model) -> None:
    task = get_task("token-classification")
    with pytest.raises(SpecError) as info:
        task.parse_params({"stride": 16}, key="stages[0].params")
    assert info.value.key == "stages[0].params.stride" and "aggregation_strategy" in str(info.value)
    with pytest.raises(SpecError) as info:
        task.parse_params({"aggregation_strategy": "mean"}, key="p")
    assert info.value.key == "p.aggregation_strategy"
    with pytest.raises(SpecError) as info:
        task.parse_params({"aggregation_strategy": "simple", "stride": -1}, key="p")
    assert info.value.key == "p.stride"
    # Windows of 128 tokens minus [CLS]/[SEP] must advance: the stride is checked against the model.
    too_big = task.parse_params({"aggregation_strategy": "simple", "stride": 126}, key="p")
    with pytest.raises(SpecError, match="less than 126"):
        task.load_preprocessor(str(ner_model), too_big)
    schema = task.output_schema(task.parse_params({"aggregation_strategy": "first"}, key="p"))
    assert schema.field("entities").type.value_type.names == ["entity_group", "score", "word", "start", "end"]
    schema = task.output_schema(task.parse_params({}, key="p"))
    assert schema.field("entities").type.value_type.names == [
        "entity",
        "score",
        "index",
        "word",
        "start",
        "end",
    ]


@pytest.mark.timeout(240)
def test_inference_job_parity_long_text_and_error_records(ray_session, ner_model, pipe, long_text, tmp_path):
    from pipeline.commit import read_errors, read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec
    from tests.helpers import job_dict, write_texts_parquet

    texts: list[Any] = make_texts(30, seed=11, max_words=120) + [long_text, "", "Spielberg's (film)!"]
    bad = [5, 17, 26]
    for i in bad:
        texts[i] = None
    write_texts_parquet(tmp_path / "in.parquet", texts)
    params = {"aggregation_strategy": "first", "stride": 32}
    spec = parse_spec(
        job_dict(
            input_uri=str(tmp_path / "in.parquet"),
            output_uri=str(tmp_path / "out"),
            model=str(ner_model),
            task="token-classification",
            max_error_rate=0.1,
            stages=[
                {
                    "name": "ner",
                    "task": "token-classification",
                    "model": str(ner_model),
                    "inputs": {"text": "text"},
                    "params": params,
                    "batch_size": 8,
                }
            ],
        )
    )
    result = run_inference(spec, progress=False)
    assert (result.rows_in, result.rows_ok, result.rows_error) == (len(texts), len(texts) - 3, 3)
    errors = read_errors(str(tmp_path / "out"))
    assert sorted(int(i) for i in errors.column("id").to_pylist()) == bad
    assert set(errors.column("error_type").to_pylist()) == {"InvalidInput"}
    out = read_output(str(tmp_path / "out")).sort_by("id")
    assert out.schema.field("entities").type.value_type.names == [
        "entity_group",
        "score",
        "word",
        "start",
        "end",
    ]
    rows = {r["id"]: r for r in out.to_pylist()}
    ok = [i for i in range(len(texts)) if i not in bad]
    expected = pipe([texts[i] for i in ok], aggregation_strategy="first", stride=32)
    for i, exp in zip(ok, expected, strict=True):
        assert_same_entities(rows[i]["entities"], exp, "first")
    assert len(rows[30]["entities"]) > 500  # the 2,000-word text, windowed
    assert rows[31]["entities"] == []


# --- fine-tuning -------------------------------------------------------------------------------------------

# A word's tag follows from the word itself (plus B/I from its neighbour), so a tiny model can learn it.
PEOPLE = {"actor", "director", "cast"}
PLACES = {"scene", "story"}


def tagged_sentences(n: int, *, seed: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    texts, tags = [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        row = []
        for i, w in enumerate(words):
            kind = "PER" if w in PEOPLE else "LOC" if w in PLACES else None
            prev = words[i - 1] if i else None
            same = (
                prev is not None
                and kind is not None
                and (prev in PEOPLE if kind == "PER" else prev in PLACES)
            )
            row.append("O" if kind is None else ("I-" if same else "B-") + kind)
        texts.append(" ".join(words))
        tags.append(row)
    return texts, tags


def test_word_tags_align_to_first_sub_tokens(ner_model) -> None:
    task = get_task("token-classification")
    trainable = task.training(str(ner_model), label_names=NER_LABELS, max_length=32, options={})
    tokenizer = trainable.tokenizer
    words = ["boringly", "actor", "was", "dull"]  # the first word splits into several sub-tokens
    assert len(tokenizer(words[0], add_special_tokens=False)["input_ids"]) > 1
    ids = [NER_LABELS.index(t) for t in ("B-PER", "I-PER", "O", "O")]
    batch = trainable.encode({"text": [words, "a film"]}, [ids, [0, 0]])
    labels = batch["labels"][0].tolist()
    word_ids = tokenizer(words, is_split_into_words=True).word_ids()
    for t, w in enumerate(word_ids):
        first = w is not None and (t == 0 or word_ids[t - 1] != w)
        assert labels[t] == (ids[w] if first else -100)
    assert batch["labels"][1].tolist()[:4] == [-100, 0, 0, -100]  # string input: whitespace words
    every = task.training(
        str(ner_model), label_names=NER_LABELS, max_length=32, options={"label_all_tokens": True}
    )
    labels = every.encode({"text": [words]}, [ids])["labels"][0].tolist()
    n_pieces = sum(1 for w in word_ids if w == 0)
    # B-PER on the first sub-token, I-PER on the rest of the same word.
    assert labels[1 : 1 + n_pieces] == [ids[0]] + [NER_LABELS.index("I-PER")] * (n_pieces - 1)
    with pytest.raises(ValueError, match="3 words but 2 tags"):
        trainable.encode({"text": ["a b c"]}, [[0, 0]])
    with pytest.raises(SpecError) as info:
        task.parse_training_options({"label_all": True}, key="train.options")
    assert info.value.key == "train.options.label_all"


def test_training_loss_falls_in_process(ner_model) -> None:
    import torch

    torch.manual_seed(0)
    task = get_task("token-classification")
    trainable = task.training(str(ner_model), label_names=NER_LABELS, max_length=32, options={})
    model = trainable.build_model(str(ner_model)).train()
    texts, tags = tagged_sentences(32, seed=0)
    ids = [[NER_LABELS.index(t) for t in row] for row in tags]
    batch = trainable.encode({"text": texts}, ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.timeout(300)
def test_finetune_job_then_inference_on_its_output(ray_session, ner_model, tmp_path) -> None:
    from jobs.finetune import run_finetune
    from pipeline.commit import read_output
    from pipeline.execute import run_inference
    from pipeline.spec import parse_spec
    from tests.helpers import job_dict, write_texts_parquet

    texts, tags = tagged_sentences(600, seed=1)
    # Pre-split words (a list column, as in CoNLL) for training; plain text for inference.
    words = pa.array([t.split() for t in texts], pa.list_(pa.string()))
    pq.write_table(
        pa.table({"id": list(range(len(texts))), "tokens": words, "ner_tags": tags}),
        tmp_path / "train.parquet",
    )
    spec = parse_spec(
        {
            "name": "tiny-ner",
            "kind": "finetune",
            "input": {"uri": str(tmp_path / "train.parquet"), "id_column": "id"},
            "stages": [
                {
                    "name": "ner",
                    "task": "token-classification",
                    "model": str(ner_model),
                    "inputs": {"text": "tokens"},
                }
            ],
            "output": {"uri": str(tmp_path / "model")},
            "train": {
                "label_column": "ner_tags",
                "label_names": list(NER_LABELS),
                "epochs": 3,
                "lr": 3e-3,
                "batch_size": 32,
                "max_length": 32,
                "eval_fraction": 0.15,
                "options": {"label_all_tokens": False},
            },
        }
    )
    result = run_finetune(spec, progress=False)
    first, last = result.metrics[0], result.metrics[-1]
    assert last["train_loss"] < first["train_loss"] and last["eval_loss"] < first["eval_loss"]
    # Tag accuracy on first sub-tokens; tagging everything "O" would score about 0.91.
    assert last["eval_accuracy"] >= 0.97, result.metrics
    # seqeval entity F1 of the eval rows, every epoch; the tags of the first sub-tokens are the words' tags
    assert all(0.0 <= r["eval_entity_f1"] <= 1.0 for r in result.metrics)
    assert last["eval_entity_f1"] >= 0.9 and last["score"] == last["eval_entity_f1"], result.metrics
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(NER_LABELS)}

    test_texts, test_tags = tagged_sentences(60, seed=2)
    write_texts_parquet(tmp_path / "test.parquet", test_texts)
    spec = parse_spec(
        job_dict(
            input_uri=str(tmp_path / "test.parquet"),
            output_uri=str(tmp_path / "preds"),
            model=str(tmp_path / "model"),
            task="token-classification",
            stages=[
                {
                    "name": "ner",
                    "task": "token-classification",
                    "model": str(tmp_path / "model"),
                    "inputs": {"text": "text"},
                    "params": {"aggregation_strategy": "first"},
                }
            ],
        )
    )
    assert run_inference(spec, progress=False).rows_ok == 60
    rows = {r["id"]: r for r in read_output(str(tmp_path / "preds")).to_pylist()}
    hits = total = 0
    for i, (text, row_tags) in enumerate(zip(test_texts, test_tags, strict=True)):
        truth = set(_spans(text, row_tags))
        found = {(e["entity_group"], e["start"], e["end"]) for e in rows[i]["entities"]}
        hits += len(truth & found)
        total += len(truth)
    assert total > 20 and hits / total >= 0.8, (hits, total)


def _spans(text: str, tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) character spans of the BIO entities of whitespace-separated words."""
    spans, pos, current = [], 0, None
    for word, tag in zip(text.split(" "), tags, strict=True):
        start, end = pos, pos + len(word)
        pos = end + 1
        if tag.startswith("I-") and current and current[0] == tag[2:]:
            current = (current[0], current[1], end)
            continue
        if current:
            spans.append(current)
        current = (tag[2:], start, end) if tag != "O" else None
    if current:
        spans.append(current)
    return spans
