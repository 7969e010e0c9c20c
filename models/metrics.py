"""Task metrics from predictions and references, in the shapes shardwise writes (README "Tasks").

One function per task family; `METRICS` maps a task name to its function and `score` dispatches. The
numbers come from the libraries users already trust: scikit-learn (classification), seqeval (entities),
jiwer (WER/CER), pycocotools' COCOeval (detection mAP: the reference implementation torchmetrics'
`MeanAveragePrecision` delegates to; that class also needs torchvision, which shardwise does not ship),
torchmetrics `MeanIoU` (segmentation), sacrebleu (BLEU) and rouge-score (ROUGE). SQuAD EM/F1 is the
official SQuAD v1.1 script's normalisation, written out below (a dozen lines; no package ships it alone).

Inputs, per row (lists of equal length):
- a prediction: the row's task fields as a dict (`{"label": ..., "score": ...}`, `{"entities": [...]}`, ...)
  or None for a row without a prediction (an error record): counted in `rows_missing`, not scored;
- a reference: what the task's labelled column holds (see each function), or None: counted in
  `rows_unlabelled`, not scored.

Every result is a flat dict of overall metrics plus `rows_scored`, `rows_missing`, `rows_unlabelled`, and
`per_class` ({class: {metric: value}}) for the tasks that have classes. Scales: fractions in [0, 1]
everywhere except BLEU, which keeps sacrebleu's 0-100.

Heavy imports (torch, sklearn, ...) stay inside the functions: the CLI imports this module.
"""

from __future__ import annotations

import collections
import contextlib
import io
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from models.masks import decode_mask
from pipeline.errors import ShardwiseError

__all__ = [
    "IGNORE_INDEX",
    "METRICS",
    "MetricsError",
    "asr_metrics",
    "classification_metrics",
    "depth_metrics",
    "detection_metrics",
    "epoch_metrics",
    "qa_metrics",
    "rouge_metrics",
    "score",
    "segmentation_metrics",
    "tag_sequence_metrics",
    "token_classification_metrics",
    "translation_metrics",
]

# A pixel of a class-index map with this value is not scored (the segmentation fine-tune's ignore_index).
IGNORE_INDEX = 255
# Depth pixels with a reference at or below this are invalid (no measurement), as in KITTI/NYU evaluation.
_MIN_DEPTH = 1e-6


class MetricsError(ShardwiseError):
    """Predictions or references cannot be scored (a task without metrics, a reference of the wrong shape)."""


Row = Mapping[str, Any] | None


def _pairs(
    predictions: Sequence[Row], references: Sequence[Any]
) -> tuple[list[Any], list[Any], dict[str, int]]:
    """The (prediction, reference) pairs that can be scored, and the counts of those that cannot."""
    if len(predictions) != len(references):
        raise MetricsError(
            f"{len(predictions)} predictions but {len(references)} references; pass one reference per prediction"
        )
    preds, refs = [], []
    missing = unlabelled = 0
    for p, r in zip(predictions, references, strict=True):
        if r is None:
            unlabelled += 1
        elif p is None:
            missing += 1
        else:
            preds.append(p)
            refs.append(r)
    if not preds:
        raise MetricsError(
            f"nothing to score: {missing} rows have no prediction and {unlabelled} have no reference"
        )
    return preds, refs, {"rows_scored": len(preds), "rows_missing": missing, "rows_unlabelled": unlabelled}


def _field(pred: Mapping[str, Any], name: str, task: str) -> Any:
    if name not in pred:
        raise MetricsError(f"a {task} prediction has no {name!r} field (fields: {sorted(pred)})")
    return pred[name]


def _name(value: Any, label_names: Sequence[str] | None) -> str:
    """A class as text: an integer id is named by label_names when given (fine-tune label ids)."""
    if label_names is not None and isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(label_names):
            raise MetricsError(f"label id {value} is outside label_names (0..{len(label_names) - 1})")
        return str(label_names[value])
    return str(value)


# -- classification ----------------------------------------------------------------------------------------
def classification_metrics(
    predictions: Sequence[Row], references: Sequence[Any], *, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Text/image/audio classification. A reference is the class: its name, or an integer id into
    `label_names`. The prediction's `label` is compared as text. `accuracy`, `macro_f1` (the unweighted mean
    of per-class F1 over the classes seen in references or predictions), `weighted_f1`, and per class
    precision/recall/F1/support."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    preds, refs, counts = _pairs(predictions, references)
    y_pred = [_name(_field(p, "label", "classification"), label_names) for p in preds]
    y_true = [_name(r, label_names) for r in refs]
    classes = sorted(set(y_true) | set(y_pred))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    _, _, weighted, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average="weighted", zero_division=0
    )
    return {
        **counts,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f.mean()),
        "weighted_f1": float(weighted),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
    }


# -- token classification ---------------------------------------------------------------------------------
def _entity_type(tag: str) -> tuple[str, str]:
    """("B"|"I", type) of an entity label: `B-PER` → (B, PER); an aggregated `PER` → (B, PER)."""
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BIES":
        return ("I" if tag[0] in "IE" else "B"), tag[2:]
    return "B", tag


def _predicted_spans(entities: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, int]]:
    """(type, start, end) of predicted entities. Aggregated ones (`entity_group`) are spans already; per-token
    ones (`entity`, aggregation_strategy none) are merged: an `I-` token of the previous token's type extends
    that entity to its own end."""
    spans: list[tuple[str, int, int]] = []
    for e in sorted(entities or (), key=lambda e: (e["start"], e["end"])):
        if "entity_group" in e:
            spans.append((str(e["entity_group"]), int(e["start"]), int(e["end"])))
            continue
        prefix, kind = _entity_type(str(e["entity"]))
        if prefix == "I" and spans and spans[-1][0] == kind:
            spans[-1] = (kind, spans[-1][1], int(e["end"]))
        else:
            spans.append((kind, int(e["start"]), int(e["end"])))
    return spans


def _gold_spans(value: Any, label_names: Sequence[str] | None) -> list[tuple[str, int, int]]:
    spans = []
    for e in value:
        kind = e.get("entity_group", e.get("label", e.get("entity")))
        if kind is None or "start" not in e or "end" not in e:
            raise MetricsError(
                "a token-classification reference span needs `entity_group` (or `label`/`entity`), `start` and "
                f"`end` (character offsets), got {dict(e)!r:.120}"
            )
        spans.append((_entity_type(_name(kind, label_names))[1], int(e["start"]), int(e["end"])))
    return spans


def _bio(spans: Sequence[tuple[str, int, int]], units: Sequence[tuple[int, int]]) -> list[str]:
    """IOB2 tags over units ((start, end) character ranges: words, or single characters): a unit that
    overlaps an entity takes its type, B- on the entity's first unit."""
    tags = ["O"] * len(units)
    for kind, start, end in sorted(spans, key=lambda s: (s[1], s[2])):
        first = True
        for i, (u0, u1) in enumerate(units):
            if u0 < end and u1 > start:
                tags[i] = f"{'B' if first else 'I'}-{kind}"
                first = False
    return tags


def token_classification_metrics(
    predictions: Sequence[Row],
    references: Sequence[Any],
    *,
    label_names: Sequence[str] | None = None,
    texts: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Entity precision/recall/F1 (seqeval, conlleval rules: an entity counts when its type and its exact
    extent match), micro over all entities, and per entity type.

    A reference is either
    - gold spans: a list of `{entity_group | label | entity, start, end}` with character offsets into the
      text (the shape of the predictions); both sides become per-character IOB2 tags, so an entity matches
      when its type and exact character extent match; or
    - tags: one IOB tag per whitespace-separated word of the text (the fine-tune's label column; names, or
      ids into `label_names`), which needs `texts`: each word takes the type of the predicted entity that
      overlaps it, so an entity matches when its type and its words match.
    """
    preds, refs, counts = _pairs(predictions, references)
    kept_texts: list[str | None] = []
    if texts is not None:
        if len(texts) != len(predictions):
            raise MetricsError(f"{len(texts)} texts for {len(predictions)} predictions")
        kept_texts = [
            t
            for t, p, r in zip(texts, predictions, references, strict=True)
            if p is not None and r is not None
        ]
    y_true, y_pred = [], []
    for i, (pred, ref) in enumerate(zip(preds, refs, strict=True)):
        spans = _predicted_spans(_field(pred, "entities", "token-classification"))
        ref = list(ref)
        if ref and not isinstance(ref[0], Mapping):  # tags per word
            if texts is None or kept_texts[i] is None:
                raise MetricsError(
                    "token-classification references that are tags per word need the text they tag (the "
                    "stage's `text` input), to find each word's characters; pass texts=, or give gold spans"
                )
            words = [(m.start(), m.end()) for m in re.finditer(r"\S+", kept_texts[i])]
            tags = [_name(t, label_names) for t in ref]
            if len(tags) != len(words):
                raise MetricsError(
                    f"a reference has {len(tags)} tags but its text has {len(words)} whitespace-separated words; "
                    "the labelled column needs one tag per word"
                )
            y_true.append(tags)
            y_pred.append(_bio(spans, words))
        else:  # gold spans (or none): tag characters
            gold = _gold_spans(ref, label_names)
            n = max([e for _, _, e in gold + spans], default=0)
            chars = [(c, c + 1) for c in range(n)]
            y_true.append(_bio(gold, chars))
            y_pred.append(_bio(spans, chars))
    return {**counts, **tag_sequence_metrics(y_pred, y_true)}


def tag_sequence_metrics(predicted: Sequence[Sequence[str]], true: Sequence[Sequence[str]]) -> dict[str, Any]:
    """seqeval entity `precision`, `recall`, `f1` (micro, conlleval rules) and `per_class`, of IOB tag
    sequences (one list of tag names per row; the fine-tune scores its words' tags with this)."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    y_pred, y_true = [list(p) for p in predicted], [list(t) for t in true]
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    return {
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "per_class": {
            kind: {
                "precision": float(v["precision"]),
                "recall": float(v["recall"]),
                "f1": float(v["f1-score"]),
                "support": int(v["support"]),
            }
            for kind, v in report.items()
            if not kind.endswith(" avg")
        },
    }


# -- question answering -----------------------------------------------------------------------------------
def _normalize_answer(text: str) -> str:
    """SQuAD v1.1 evaluation script: lowercase, drop punctuation, the articles a/an/the, extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _squad_f1(prediction: str, truth: str) -> float:
    pred_tokens, true_tokens = _normalize_answer(prediction).split(), _normalize_answer(truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(true_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def _answer_texts(ref: Any) -> list[str]:
    if isinstance(ref, str):
        return [ref]
    if isinstance(ref, Mapping) and "text" in ref:
        texts = ref["text"]
        return [texts] if isinstance(texts, str) else [str(t) for t in texts]
    if isinstance(ref, Sequence):
        return [str(t) for t in ref]
    raise MetricsError(
        "a question-answering reference is an answer string, a list of them, or SQuAD `answers` "
        f"{{text: [...], answer_start: [...]}}, got {ref!r:.120}"
    )


def qa_metrics(
    predictions: Sequence[Row], references: Sequence[Any], *, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Extractive QA: SQuAD `exact_match` and token `f1` of the predicted `answer`, each the best over the
    row's gold answers (a string, a list of strings, or SQuAD `answers` {text, answer_start}), averaged over
    rows. A row whose gold answers are all empty (unanswerable) scores 1 when the prediction is empty too."""
    preds, refs, counts = _pairs(predictions, references)
    em = f1 = 0.0
    for pred, ref in zip(preds, refs, strict=True):
        answer = str(_field(pred, "answer", "question-answering") or "")
        golds = [g for g in _answer_texts(ref) if g] or [""]
        em += max(float(_normalize_answer(answer) == _normalize_answer(g)) for g in golds)
        f1 += max(_squad_f1(answer, g) if g else float(not _normalize_answer(answer)) for g in golds)
    return {**counts, "exact_match": em / len(preds), "f1": f1 / len(preds)}


# -- generated text ---------------------------------------------------------------------------------------
def _text(pred: Mapping[str, Any], field: str, task: str) -> str:
    value = _field(pred, field, task)
    if isinstance(value, list):  # num_return_sequences > 1: the first (best) sequence
        value = value[0] if value else ""
    return str(value or "")


def _generation_field(pred: Mapping[str, Any]) -> str:
    for name in ("summary_text", "translation_text", "generated_text"):
        if name in pred:
            return name
    raise MetricsError(
        f"a prediction has none of summary_text, translation_text, generated_text (fields: {sorted(pred)})"
    )


def translation_metrics(
    predictions: Sequence[Row], references: Sequence[Any], *, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Corpus BLEU (sacrebleu, its default 13a tokenisation; 0-100) and chrF of `translation_text`. A
    reference is the translation, or a list of translations (every row the same number)."""
    import sacrebleu

    preds, refs, counts = _pairs(predictions, references)
    hyps = [_text(p, _generation_field(p), "translation") for p in preds]
    multi = [r if isinstance(r, list | tuple) else [r] for r in refs]
    width = {len(r) for r in multi}
    if len(width) != 1:
        raise MetricsError(
            "translation references: every row needs the same number of reference translations"
        )
    streams = [[str(r[k]) for r in multi] for k in range(width.pop())]
    return {
        **counts,
        "bleu": float(sacrebleu.corpus_bleu(hyps, streams).score),
        "chrf": float(sacrebleu.corpus_chrf(hyps, streams).score) / 100,
    }


def rouge_metrics(
    predictions: Sequence[Row], references: Sequence[Any], *, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """ROUGE-1/2/L F-measure (rouge-score, no stemming), the mean over rows, of `summary_text` (or
    `generated_text` for text generation: with `return_full_text` it includes the prompt) against the
    reference text."""
    from rouge_score import rouge_scorer

    preds, refs, counts = _pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    totals = dict.fromkeys(("rouge1", "rouge2", "rougeL"), 0.0)
    for pred, ref in zip(preds, refs, strict=True):
        scores = scorer.score(str(ref), _text(pred, _generation_field(pred), "summarization"))
        for k in totals:
            totals[k] += scores[k].fmeasure
    return {**counts, **{k: v / len(preds) for k, v in totals.items()}}


# -- speech recognition -----------------------------------------------------------------------------------
def asr_metrics(
    predictions: Sequence[Row], references: Sequence[Any], *, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Corpus word and character error rates (jiwer) of `text` against the reference transcript, as they
    are (normalise both sides before, e.g. lowercase, if the model's casing differs from the labels')."""
    import jiwer

    preds, refs, counts = _pairs(predictions, references)
    pairs = [
        (str(r), _text(p, "text", "automatic-speech-recognition")) for p, r in zip(preds, refs, strict=True)
    ]
    empty = sum(1 for r, _ in pairs if not r.strip())
    pairs = [(r, h) for r, h in pairs if r.strip()]  # jiwer cannot score an empty reference
    if not pairs:
        raise MetricsError("every reference transcript is empty; nothing to score")
    truth, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    return {
        **counts,
        "rows_scored": len(pairs),
        "rows_unlabelled": counts["rows_unlabelled"] + empty,
        "wer": float(jiwer.wer(truth, hyps)),
        "cer": float(jiwer.cer(truth, hyps)),
    }


# -- detection --------------------------------------------------------------------------------------------
def _xyxy(obj: Mapping[str, Any]) -> list[float]:
    box = obj.get("box")
    if isinstance(box, Mapping):
        return [float(box["xmin"]), float(box["ymin"]), float(box["xmax"]), float(box["ymax"])]
    if "bbox" in obj:  # COCO annotation: [x, y, w, h]
        x, y, w, h = (float(v) for v in obj["bbox"])
        return [x, y, x + w, y + h]
    raise MetricsError(
        f"a box is `box: {{xmin, ymin, xmax, ymax}}` or a COCO `bbox: [x, y, w, h]`, got {dict(obj)!r:.120}"
    )


def _object_label(obj: Mapping[str, Any], label_names: Sequence[str] | None) -> str:
    kind = obj.get("label", obj.get("category_id"))
    if kind is None:
        raise MetricsError(f"an object needs `label` (or COCO `category_id`), got {dict(obj)!r:.120}")
    return _name(kind, label_names)


def detection_metrics(
    predictions: Sequence[Row], references: Sequence[Any], *, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """COCO mAP (pycocotools COCOeval, bbox): `map` (IoU 0.50:0.95), `map_50`, `map_75`, `mar_100`, and AP
    per class. A reference is the image's list of gold objects: `{label, box: {xmin, ymin, xmax, ymax}}` (the
    predictions' shape) or COCO annotations `{category_id, bbox: [x, y, w, h]}` (ids named by label_names).
    A class with no gold object has no AP (-1 in COCO terms) and is left out of per_class."""
    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    preds, refs, counts = _pairs(predictions, references)
    classes: dict[str, int] = {}
    images, gold, dets = [], [], []
    for i, (pred, ref) in enumerate(zip(preds, refs, strict=True)):
        images.append({"id": i + 1})
        for obj in ref:
            x0, y0, x1, y1 = _xyxy(obj)
            cat = classes.setdefault(_object_label(obj, label_names), len(classes) + 1)
            w, h = x1 - x0, y1 - y0
            gold.append(
                {
                    "id": len(gold) + 1,
                    "image_id": i + 1,
                    "category_id": cat,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for obj in _field(pred, "objects", "object-detection") or ():
            x0, y0, x1, y1 = _xyxy(obj)
            cat = classes.setdefault(_object_label(obj, label_names), len(classes) + 1)
            score = obj.get("score")
            dets.append(
                {
                    "image_id": i + 1,
                    "category_id": cat,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": 1.0 if score is None else float(score),
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": gold,
        "categories": [{"id": c, "name": n} for n, c in classes.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and summary table
        coco.createIndex()
        found = coco.loadRes(dets) if dets else COCO()
        if not dets:
            found.dataset = {"images": images, "annotations": [], "categories": coco.dataset["categories"]}
            found.createIndex()
        ev = COCOeval(coco, found, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(v) for v in ev.stats]  # COCO's 12 summary numbers; -1 where there is nothing to measure
    # precision: (iou thresholds T, recall points R, classes K, area ranges A, max dets M); area "all", 100 dets
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for name, cat in classes.items():
        k = ev.params.catIds.index(cat)
        values = precision[:, :, k]
        if (values > -1).any():
            per_class[name] = {
                "ap": float(np.mean(values[values > -1])),
                "gold": sum(1 for g in gold if g["category_id"] == cat),
            }
    return {
        **counts,
        "map": max(stats[0], 0.0),
        "map_50": max(stats[1], 0.0),
        "map_75": max(stats[2], 0.0),
        "mar_100": max(stats[8], 0.0),
        "per_class": per_class,
    }


# -- segmentation -----------------------------------------------------------------------------------------
def _index_map(value: Any, label_names: Sequence[str] | None) -> Any:
    """A class-index map (nested lists, an array, PNG bytes or an Image struct {bytes, path}) → (H, W) int."""
    import numpy as np

    if isinstance(value, Mapping) and "bytes" in value:
        value = value["bytes"]
    if isinstance(value, bytes | bytearray):
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(value))).astype(np.int64)
    return np.asarray(value, dtype=np.int64)


def segmentation_metrics(
    predictions: Sequence[Row], references: Sequence[Any], *, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Mean IoU (torchmetrics `MeanIoU`: per class, the IoU of each image where the class is predicted or
    present, averaged over those images; `mean_iou` is the mean over classes) and pixel accuracy (over the
    scored pixels, background included). A reference is the image's segments `{label, mask}` (the predictions' shape, masks
    as COCO RLE) or a class-index map (nested lists, PNG bytes; `label_names` names the indices; 255 is
    not scored). Pixels no segment covers are background and are not a class."""
    import numpy as np
    import torch
    from torchmetrics.segmentation import MeanIoU

    preds, refs, counts = _pairs(predictions, references)
    classes: dict[str, int] = {}  # name → index; 0 is background

    def paint(segments: Sequence[Mapping[str, Any]], shape: tuple[int, ...] | None) -> Any:
        out = None if shape is None else np.zeros(shape, np.int64)
        for seg in segments or ():
            mask = decode_mask(seg["mask"])
            out = np.zeros(mask.shape, np.int64) if out is None else out
            if mask.shape != out.shape:
                raise MetricsError(f"a mask of size {list(mask.shape)} on an image of size {list(out.shape)}")
            out[mask] = classes.setdefault(_name(seg["label"], label_names), len(classes) + 1)
        return out

    maps = []
    for pred, ref in zip(preds, refs, strict=True):
        ignore = None
        if isinstance(ref, list | tuple) and (not ref or isinstance(ref[0], Mapping)):
            gold = paint(ref, None)
        else:
            index = _index_map(ref, label_names)
            ignore = index == IGNORE_INDEX
            gold = np.zeros(index.shape, np.int64)
            for value in np.unique(index[~ignore]):
                gold[index == value] = classes.setdefault(_name(int(value), label_names), len(classes) + 1)
        segments = _field(pred, "segments", "image-segmentation")
        guess = paint(segments, None if gold is None else gold.shape)
        if gold is None:  # no gold segment: the whole image is background
            gold = np.zeros(guess.shape if guess is not None else (1, 1), np.int64)
        guess = np.zeros(gold.shape, np.int64) if guess is None else guess
        if guess.shape != gold.shape:
            raise MetricsError(
                f"a predicted mask of size {list(guess.shape)} for a reference of {list(gold.shape)}"
            )
        if ignore is not None:
            gold[ignore] = guess[ignore] = 0
            valid = ~ignore
        else:
            valid = np.ones(gold.shape, bool)
        maps.append((guess, gold, valid))
    if not classes:
        raise MetricsError("no class appears in the predictions or the references; nothing to score")
    metric = MeanIoU(
        num_classes=len(classes) + 1, include_background=False, per_class=True, input_format="index"
    )
    correct = labelled = 0
    for guess, gold, valid in maps:
        metric.update(torch.from_numpy(guess)[None], torch.from_numpy(gold)[None])
        correct += int((guess[valid] == gold[valid]).sum())
        labelled += int(valid.sum())
    per_class_iou = metric.compute().tolist()  # (K,), -1 for a class never present
    names = sorted(classes, key=classes.__getitem__)
    per_class = {n: {"iou": float(v)} for n, v in zip(names, per_class_iou, strict=True) if v >= 0}
    return {
        **counts,
        "mean_iou": float(np.mean([v["iou"] for v in per_class.values()])) if per_class else 0.0,
        "pixel_accuracy": correct / labelled if labelled else 0.0,
        "per_class": per_class,
    }


# -- depth ------------------------------------------------------------------------------------------------
def _depth_array(value: Any) -> Any:
    import numpy as np

    if isinstance(value, Mapping) and "data" in value:
        from models.depth_estimation import decode_depth

        return decode_depth(value)
    return np.asarray(value, dtype=np.float32)


def depth_metrics(
    predictions: Sequence[Row], references: Sequence[Any], *, label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Depth: `delta1` (share of pixels with max(pred/true, true/pred) < 1.25), `abs_rel` (mean |pred - true|
    / true) and `rmse`, each computed per image over pixels with a positive reference, then averaged over
    images. A reference is a depth map: this task's `depth` struct or nested lists (H, W), the same size as
    the prediction. Depth is compared as it is: a model that predicts relative depth needs scaling first."""
    import numpy as np

    preds, refs, counts = _pairs(predictions, references)
    d1, rel, rmse = [], [], []
    for pred, ref in zip(preds, refs, strict=True):
        guess, truth = _depth_array(_field(pred, "depth", "depth-estimation")), _depth_array(ref)
        if guess.shape != truth.shape:
            raise MetricsError(
                f"a predicted depth map of {list(guess.shape)} for a reference of {list(truth.shape)}"
            )
        valid = np.isfinite(truth) & (truth > _MIN_DEPTH) & np.isfinite(guess)
        if not valid.any():
            continue
        g, t = np.maximum(guess[valid].astype(np.float64), _MIN_DEPTH), truth[valid].astype(np.float64)
        d1.append(float((np.maximum(g / t, t / g) < 1.25).mean()))
        rel.append(float((np.abs(g - t) / t).mean()))
        rmse.append(float(np.sqrt(((g - t) ** 2).mean())))
    if not d1:
        raise MetricsError("no reference depth map has a valid (positive, finite) pixel")
    return {
        **counts,
        "delta1": float(np.mean(d1)),
        "abs_rel": float(np.mean(rel)),
        "rmse": float(np.mean(rmse)),
    }


MetricFn = Callable[..., dict[str, Any]]


def epoch_metrics(
    fn: MetricFn, pairs: Sequence[tuple[Any, Any]], keys: Mapping[str, str], **kwargs: Any
) -> dict[str, float]:
    """A fine-tune epoch's task metrics (`Trainable.eval_metrics`): `fn` (a function above) over the eval
    rows' (prediction, reference) pairs, the results named in `keys` renamed to the epoch record's keys,
    e.g. `{"f1": "eval_f1"}`."""
    result = fn([p for p, _ in pairs], [r for _, r in pairs], **kwargs)
    return {record_key: float(result[key]) for key, record_key in keys.items()}


METRICS: dict[str, MetricFn] = {
    "text-classification": classification_metrics,
    "image-classification": classification_metrics,
    "audio-classification": classification_metrics,
    "token-classification": token_classification_metrics,
    "question-answering": qa_metrics,
    "automatic-speech-recognition": asr_metrics,
    "object-detection": detection_metrics,
    "image-segmentation": segmentation_metrics,
    "depth-estimation": depth_metrics,
    "translation": translation_metrics,
    "summarization": rouge_metrics,
    "text-generation": rouge_metrics,
}


def score(
    task: str,
    predictions: Sequence[Row],
    references: Sequence[Any],
    *,
    label_names: Sequence[str] | None = None,
    texts: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """The metrics of `task` for these predictions against these references (see the module docstring).
    `texts` is only used by token-classification with tag references (one tag per word of the text)."""
    fn = METRICS.get(task)
    if fn is None:
        raise MetricsError(f"task {task!r} has no metrics; tasks with metrics: {', '.join(sorted(METRICS))}")
    try:
        if fn is token_classification_metrics:
            return fn(predictions, references, label_names=label_names, texts=texts)
        return fn(predictions, references, label_names=label_names)
    except ImportError as e:
        raise MetricsError(
            f"the metrics of {task!r} need the package {e.name!r}, which is not installed; it is a dependency "
            f"of shardwise: reinstall it (pip install 'shardwise') or pip install {e.name}"
        ) from e
