"""Per-epoch task metrics of fine-tuning (pipeline.train.loop "Task metrics"): each task's `eval_predictions` on
hand-made model outputs whose metric is known, then its `eval_metrics` (no Ray; tiny models for the
tokenizers and processors). The Ray runs of tests/jobs/test_finetune.py and tests/models/test_*.py check that
the epoch records carry these keys."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from models.registry import get_task
from pipeline.train.loop import epoch_score, gathered_metrics, shown_eval, split_extras
from tests.helpers import make_text_classifier
from tests.models.audio_helpers import make_ctc_model
from tests.models.gen_helpers import make_causal_lm, make_seq2seq
from tests.models.nlp_helpers import NER_LABELS, make_qa_model, make_token_classifier
from tests.models.seg_depth_helpers import make_glpn, make_segformer
from tests.models.vision_helpers import SHAPE_NAMES, make_detr

_BIG = 20.0  # a logit that wins any softmax / argmax against zeros


def _trainable(task: str, base: Path, *, label_names: tuple[str, ...] = (), max_length: int = 64, **options):
    return get_task(task).training(str(base), label_names=label_names, max_length=max_length, options=options)


def _metrics(trainable: Any, output: Any, batch: dict[str, Any], *, model: Any = None) -> dict[str, float]:
    """What one worker's epoch records: the pairs of this batch → the task metrics (world of one)."""
    pairs = trainable.eval_predictions(output, batch, model=model)
    return gathered_metrics(trainable, pairs, rank=0, world=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("epoch-metrics")
    return {
        "text": make_text_classifier(root / "text", num_labels=2),
        "ner": make_token_classifier(root / "ner"),
        "qa": make_qa_model(root / "qa"),
        "ctc": make_ctc_model(root / "ctc"),
        "detr": make_detr(root / "detr"),
        "segformer": make_segformer(root / "segformer"),
        "glpn": make_glpn(root / "glpn"),
        "bart": make_seq2seq(root / "bart", arch="bart"),
        "gpt2": make_causal_lm(root / "gpt2"),
    }


def test_classification_macro_f1(models: dict[str, Path]) -> None:
    trainable = _trainable("text-classification", models["text"], label_names=("neg", "pos"))
    batch = trainable.encode({"text": ["a", "b", "c", "d"]}, [0, 1, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])  # predicts 0, 1, 0, 1
    got = _metrics(trainable, SimpleNamespace(logits=logits), batch)
    # neg: precision 1/2, recall 1 → F1 2/3; pos: precision 1, recall 2/3 → F1 4/5
    assert got == {"eval_macro_f1": pytest.approx((2 / 3 + 4 / 5) / 2)}
    assert trainable.eval_score == ("eval_macro_f1", "max")


def test_token_classification_scores_words_not_sub_tokens(models: dict[str, Path]) -> None:
    trainable = _trainable(
        "token-classification", models["ner"], label_names=NER_LABELS, label_all_tokens=True
    )
    tag = {name: i for i, name in enumerate(NER_LABELS)}
    words = ["alice", "walked", "to", "the", "paris", "gate"]
    gold = ["B-PER", "O", "O", "O", "B-LOC", "I-LOC"]
    batch = trainable.encode({"text": [words]}, [[tag[t] for t in gold]])
    inputs, extras = split_extras(batch)
    assert set(extras) == {"_first"} and "_first" not in inputs  # extras never reach the model
    # Predicted: the person right, the location cut short (B-LOC O): 1 of 2 gold entities, 2 predicted.
    predicted = ["B-PER", "O", "O", "O", "B-LOC", "O"]
    logits = torch.zeros((1, batch["input_ids"].shape[1], len(NER_LABELS)))
    positions = np.flatnonzero(batch["_first"][0])
    assert len(positions) == len(words)
    for t, name in zip(positions, predicted, strict=True):
        logits[0, t, tag[name]] = _BIG
    # Later sub-tokens (label_all_tokens trains them) are not scored: a wrong tag there changes nothing.
    later = [t for t in range(1, batch["input_ids"].shape[1] - 1) if t not in set(positions)]
    logits[0, later, tag["I-PER"]] = 2 * _BIG
    got = _metrics(trainable, SimpleNamespace(logits=logits), batch)
    assert got == {
        "eval_entity_precision": pytest.approx(0.5),
        "eval_entity_recall": pytest.approx(0.5),
        "eval_entity_f1": pytest.approx(0.5),
    }


def test_question_answering_exact_match_and_f1(models: dict[str, Path]) -> None:
    trainable = _trainable("question-answering", models["qa"], max_length=64)
    context = "alice lives in paris near the river"
    answers = [
        {"text": ["paris"], "answer_start": [context.index("paris")]},  # predicted exactly
        {"text": "in paris", "answer_start": context.index("in paris")},  # predicted "paris": F1 2/3
    ]
    batch = trainable.encode(
        {"question": ["where does alice live", "where"], "context": [context] * 2}, answers
    )
    windows = batch["input_ids"].shape
    start, end = torch.zeros(windows), torch.zeros(windows)
    spans = batch["_spans"]
    first, last = context.index("paris"), context.index("paris") + len("paris")
    for w in range(
        len(batch["_row"])
    ):  # "paris" may be several sub-tokens: start on the first, end on the last
        context_tokens = np.flatnonzero(batch["_is_context"][w])
        start[w, next(t for t in context_tokens if spans[w, t, 0] == first)] = _BIG
        end[w, next(t for t in context_tokens if spans[w, t, 1] == last)] = _BIG
    output = SimpleNamespace(start_logits=start, end_logits=end)
    pairs = trainable.eval_predictions(output, batch, model=None)
    assert [p["answer"] for p, _ in pairs] == ["paris", "paris"]
    got = gathered_metrics(trainable, pairs, rank=0, world=1)
    assert got == {"eval_exact_match": pytest.approx(0.5), "eval_f1": pytest.approx((1 + 2 / 3) / 2)}


def test_speech_recognition_wer_and_cer_from_greedy_ctc(models: dict[str, Path]) -> None:
    chars = tuple(sorted(set("hello world") - {" "}))
    trainable = _trainable("automatic-speech-recognition", models["ctc"], label_names=chars)
    tok = trainable.tokenizer
    # Frames spelling "hello world" with one l lost: repeats merge, blanks (<pad>) split, "|" is a space.
    frames = ["h", "h", "e", "l", "l", "<pad>", "o", "|", "w", "o", "<pad>", "r", "l", "d", "<pad>"]
    logits = torch.zeros((1, len(frames), len(tok)))
    for f, token in enumerate(frames):
        logits[0, f, tok.convert_tokens_to_ids(token)] = _BIG
    got = _metrics(trainable, SimpleNamespace(logits=logits), {"_transcripts": ["hello world"]})
    # "helo world": 1 of 2 words wrong; 1 deleted character of 11
    assert got == {"eval_wer": pytest.approx(0.5), "eval_cer": pytest.approx(1 / 11)}
    assert trainable.eval_score == ("eval_wer", "min")
    # lower is better: the best epoch is the one with the lowest WER
    assert epoch_score({"epoch": 1, "eval_wer": 0.2}, trainable.eval_score) > epoch_score(
        {"epoch": 2, "eval_wer": 0.5}, trainable.eval_score
    )


def test_detection_map_from_the_processors_post_process(models: dict[str, Path]) -> None:
    from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput

    trainable = _trainable("object-detection", models["detr"], label_names=SHAPE_NAMES)
    queries, classes = 12, len(SHAPE_NAMES) + 1  # + "no object"
    height, width = 100, 200
    gold = [
        [{"bbox": [20.0, 10.0, 40.0, 30.0], "category_id": 1}],
        [{"bbox": [100.0, 50.0, 20.0, 20.0], "category_id": 0}],
    ]
    logits = torch.zeros((2, queries, classes))
    logits[:, :, -1] = _BIG  # every query: no object (low scores for the real classes) ...
    boxes = torch.full((2, queries, 4), 0.05)
    # ... except image 0's query 0: class 1 exactly on the gold box (normalised cx, cy, w, h)
    logits[0, 0] = 0.0
    logits[0, 0, 1] = _BIG
    boxes[0, 0] = torch.tensor([(20 + 20) / width, (10 + 15) / height, 40 / width, 30 / height])
    output = DetrObjectDetectionOutput(logits=logits, pred_boxes=boxes)
    batch = {"_sizes": [(height, width)] * 2, "_objects": gold}
    pairs = trainable.eval_predictions(output, batch, model=None)
    best = max(pairs[0][0]["objects"], key=lambda o: o["score"])
    assert best["label"] == 1 and best["box"] == pytest.approx(
        {"xmin": 20.0, "ymin": 10.0, "xmax": 60.0, "ymax": 40.0}
    )
    got = gathered_metrics(trainable, pairs, rank=0, world=1)
    # Class 1: its one object found first → AP 1. Class 0: its object (image 1) is never found → AP 0.
    assert got == {"eval_map": pytest.approx(0.5), "eval_map_50": pytest.approx(0.5)}


def test_segmentation_mean_iou_ignores_void_pixels(models: dict[str, Path]) -> None:
    from transformers.modeling_outputs import SemanticSegmenterOutput

    trainable = _trainable("image-segmentation", models["segformer"])
    gold = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 255, 1]], dtype=np.uint8)
    predicted = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    logits = torch.zeros((1, 4, 4, 4))  # (B, classes, H, W) at the map's size: upsampling is the identity
    logits[0, torch.from_numpy(predicted), torch.arange(4)[:, None], torch.arange(4)[None, :]] = _BIG
    got = _metrics(trainable, SemanticSegmenterOutput(logits=logits), {"_maps": [gold]})
    # class 0: 8 right of 10 predicted → 0.8; class 1: 5 right of 7 gold (the 255 pixel is not scored)
    assert got == {
        "eval_mean_iou": pytest.approx((0.8 + 5 / 7) / 2),
        "eval_pixel_accuracy": pytest.approx(13 / 15),
    }


def test_depth_delta1_abs_rel_rmse(models: dict[str, Path]) -> None:
    from transformers.modeling_outputs import DepthEstimatorOutput

    trainable = _trainable("depth-estimation", models["glpn"])
    truth = np.array([[1.0, 2.0], [4.0, 0.0]], dtype=np.float32)  # 0: no measurement, not scored
    predicted = torch.tensor([[[1.0, 2.4], [2.0, 5.0]]])
    got = _metrics(trainable, DepthEstimatorOutput(predicted_depth=predicted), {"_depths": [truth]})
    assert got == {
        "eval_delta1": pytest.approx(2 / 3),  # ratios 1, 1.2, 2
        "eval_abs_rel": pytest.approx((0 + 0.2 + 0.5) / 3),
        "eval_rmse": pytest.approx(math.sqrt((0 + 0.16 + 4) / 3), rel=1e-5),
    }


@pytest.mark.parametrize(
    ("task", "generated", "target", "expected"),
    [
        (
            "translation",
            "the cat sat on the mat",
            "the cat sat on the mat",
            {"eval_bleu": 100.0, "eval_chrf": 1.0},
        ),
        # ROUGE-L: the longest common subsequence "the cat sat on mat" is 5 of 6 words on both sides
        ("summarization", "the cat sat on the mat", "the cat sat on a mat", {"eval_rougeL": 5 / 6}),
    ],
)
def test_seq2seq_generates_greedily_within_max_target_length(
    models: dict[str, Path], task: str, generated: str, target: str, expected: dict[str, float]
) -> None:
    trainable = _trainable(task, models["bart"], max_length=32, max_target_length=12)
    batch = trainable.encode({"text": ["a source text"]}, [target])
    tok = trainable.tokenizer
    calls = []

    def generate(**kwargs: Any) -> torch.Tensor:
        calls.append(kwargs)
        return torch.tensor([tok(generated)["input_ids"]])

    pairs = trainable.eval_predictions(SimpleNamespace(), batch, model=SimpleNamespace(generate=generate))
    assert calls[0]["max_new_tokens"] == 12 and calls[0]["num_beams"] == 1 and not calls[0]["do_sample"]
    assert (
        pairs[0][0][f"{'summary' if task == 'summarization' else 'translation'}_text"].split()
        == generated.split()
    )
    got = gathered_metrics(trainable, pairs, rank=0, world=1)
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    assert trainable.eval_score == ({"translation": "eval_bleu", "summarization": "eval_rougeL"}[task], "max")


def test_text_generation_perplexity(models: dict[str, Path]) -> None:
    trainable = _trainable("text-generation", models["gpt2"])
    batch = trainable.encode({"text": ["the cat sat", "a dog"]}, None)
    vocab = 50
    # Uniform next-token logits: every target costs log(vocab) nats, so the perplexity is the vocabulary size.
    logits = torch.zeros((*batch["input_ids"].shape, vocab))
    batch["labels"] = batch["labels"].clamp(max=vocab - 1).where(batch["labels"] != -100, -100)
    got = _metrics(trainable, SimpleNamespace(logits=logits), batch)
    assert got == {"eval_perplexity": pytest.approx(vocab)}
    assert trainable.eval_score == ("eval_perplexity", "min")


def test_score_and_progress_line() -> None:
    record = {"epoch": 3, "eval_loss": 0.7, "eval_accuracy": 0.81, "eval_wer": 0.25}
    assert epoch_score(record, ("eval_wer", "min")) == -0.25
    assert epoch_score(record, ("eval_f1", "max")) == 0.81  # no such metric this epoch: the accuracy
    assert epoch_score({"epoch": 3, "eval_loss": 0.7, "eval_accuracy": None}, None) == -0.7
    assert epoch_score({"epoch": 3, "eval_loss": None}, None) == 3.0
    assert shown_eval(record, ("eval_wer", "min")) == {"acc": 0.81, "wer": 0.25}


def test_nothing_to_score_gives_no_task_metrics(models: dict[str, Path]) -> None:
    """Every reference transcript empty: the epoch has no WER (logged), the job goes on."""
    trainable = _trainable("automatic-speech-recognition", models["ctc"], label_names=("a",))
    assert gathered_metrics(trainable, [({"text": "a"}, "")], rank=0, world=1) == {}
