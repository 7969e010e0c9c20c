"""Task metrics on hand-made predictions whose values are known (worked out by hand in each test)."""

from __future__ import annotations

import numpy as np
import pytest

from models.masks import encode_mask
from models.metrics import METRICS, MetricsError, score


def _labels(*names):
    return [{"label": n, "score": 0.9} for n in names]


def test_classification_accuracy_macro_f1_and_per_class():
    # gold: pos pos neg neg; predicted: pos neg neg neg → 3 of 4 right.
    # pos: P=1/1, R=1/2, F1=2/3; neg: P=2/3, R=2/2, F1=0.8 → macro-F1 = (2/3 + 0.8) / 2 = 11/15.
    result = score("text-classification", _labels("pos", "neg", "neg", "neg"), ["pos", "pos", "neg", "neg"])
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["macro_f1"] == pytest.approx(11 / 15)
    assert result["per_class"]["pos"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )
    assert result["per_class"]["neg"]["precision"] == pytest.approx(2 / 3)
    assert result["rows_scored"] == 4 and result["rows_missing"] == 0


def test_classification_integer_references_named_by_label_names_and_missing_rows():
    # references are fine-tune ids; a None prediction (an error record) and a None reference are not scored.
    preds = [*_labels("neg", "pos"), None, _labels("pos")[0]]
    result = score("image-classification", preds, [0, 0, 1, None], label_names=["neg", "pos"])
    assert result["accuracy"] == pytest.approx(0.5)
    assert (result["rows_scored"], result["rows_missing"], result["rows_unlabelled"]) == (2, 1, 1)


def _ent(group, start, end):
    return {"entity_group": group, "score": 0.9, "word": "", "start": start, "end": end}


def test_token_classification_entity_f1_from_gold_spans():
    # text: "Ada Lovelace met Babbage in London"; gold: PER 0-12, PER 17-24, LOC 28-34.
    # predicted: PER 0-12 (right), PER 17-24 as ORG (wrong type), LOC 28-34 (right) → P = R = F1 = 2/3.
    gold = [[_ent("PER", 0, 12), _ent("PER", 17, 24), _ent("LOC", 28, 34)]]
    preds = [{"entities": [_ent("PER", 0, 12), _ent("ORG", 17, 24), _ent("LOC", 28, 34)]}]
    result = score("token-classification", preds, gold)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["per_class"]["PER"]["recall"] == pytest.approx(0.5)
    assert result["per_class"]["LOC"]["f1"] == pytest.approx(1.0)
    assert result["per_class"]["ORG"]["precision"] == 0.0


def test_token_classification_partial_extent_is_a_miss():
    # "Ada Lovelace" predicted as just "Ada": the extent differs, so no entity matches.
    result = score("token-classification", [{"entities": [_ent("PER", 0, 3)]}], [[_ent("PER", 0, 12)]])
    assert result["f1"] == 0.0


def test_token_classification_from_word_tags_and_per_token_predictions():
    text = "Ada Lovelace met Babbage"
    tags = ["B-PER", "I-PER", "O", "B-PER"]
    # strategy `none`: one entry per token, B-/I- prefixes; "Lovelace" continues "Ada", "Babbage" is missed.
    preds = [
        {
            "entities": [
                {"entity": "B-PER", "score": 0.9, "index": 1, "word": "Ada", "start": 0, "end": 3},
                {"entity": "I-PER", "score": 0.9, "index": 2, "word": "Love", "start": 4, "end": 8},
                {"entity": "I-PER", "score": 0.9, "index": 3, "word": "##lace", "start": 8, "end": 12},
            ]
        }
    ]
    result = score("token-classification", preds, [tags], texts=[text])
    assert result["precision"] == pytest.approx(1.0)  # 1 predicted, 1 right
    assert result["recall"] == pytest.approx(0.5)  # 2 gold, 1 found
    assert result["f1"] == pytest.approx(2 / 3)
    # integer tag ids through label_names give the same result
    ids = score(
        "token-classification", preds, [[1, 2, 0, 1]], label_names=["O", "B-PER", "I-PER"], texts=[text]
    )
    assert ids["f1"] == pytest.approx(2 / 3)
    with pytest.raises(MetricsError, match="one tag per word"):
        score("token-classification", preds, [tags[:3]], texts=[text])
    with pytest.raises(MetricsError, match="texts="):
        score("token-classification", preds, [tags])


def test_question_answering_exact_match_and_partial_f1():
    preds = [
        {"answer": "the Eiffel Tower", "score": 0.9, "start": 0, "end": 16},
        {"answer": "in Paris France"},
    ]
    # row 1: articles and case are normalised away → EM 1, F1 1.
    # row 2: gold "Paris" (among others): pred tokens {in, paris, france}, gold {paris}: P=1/3, R=1 → F1 0.5;
    #        the second gold "Paris, France" gives P=2/3, R=1 → F1 0.8, the best; EM 0.
    refs = ["Eiffel tower", {"text": ["Paris", "Paris, France"], "answer_start": [0, 0]}]
    result = score("question-answering", preds, refs)
    assert result["exact_match"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx((1.0 + 0.8) / 2)


def test_asr_word_error_rate_of_one_in_four():
    result = score("automatic-speech-recognition", [{"text": "the cat sat down"}], ["the cat sat up"])
    assert result["wer"] == pytest.approx(0.25)
    assert result["cer"] == pytest.approx(4 / 14)  # "down" vs "up": 2 substitutions + 2 deletions in 14 chars


def _obj(label, xmin, ymin, xmax, ymax, score=0.9):
    return {"label": label, "score": score, "box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}}


def test_detection_map_exact_box_is_one_and_shifted_box_lower():
    gold = [[_obj("cat", 10, 10, 50, 50), _obj("dog", 60, 60, 100, 100)]]
    exact = score("object-detection", [{"objects": gold[0]}], gold)
    assert exact["map"] == pytest.approx(1.0)
    assert exact["map_50"] == pytest.approx(1.0)
    assert exact["per_class"]["cat"]["ap"] == pytest.approx(1.0)
    # the cat box shifted by 12 px: IoU = 28*40 / (2*1600 - 1120) = 0.538 → found at IoU threshold 0.5 only.
    shifted = score("object-detection", [{"objects": [_obj("cat", 22, 10, 62, 50), gold[0][1]]}], gold)
    assert shifted["map_50"] == pytest.approx(1.0)
    assert shifted["map"] < exact["map"]
    assert shifted["per_class"]["cat"]["ap"] == pytest.approx(0.1)  # 1 of the 10 IoU thresholds 0.50:0.95
    assert shifted["per_class"]["dog"]["ap"] == pytest.approx(1.0)
    # COCO annotations as references ([x, y, w, h], ids named by label_names) score the same
    coco = [[{"category_id": 0, "bbox": [10, 10, 40, 40]}, {"category_id": 1, "bbox": [60, 60, 40, 40]}]]
    assert score("object-detection", [{"objects": gold[0]}], coco, label_names=["cat", "dog"])[
        "map"
    ] == pytest.approx(1.0)
    # nothing predicted: mAP 0
    assert score("object-detection", [{"objects": []}], gold)["map"] == pytest.approx(0.0)


def _seg(label, mask):
    return {"label": label, "score": None, "mask": encode_mask(mask)}


def test_segmentation_mean_iou():
    sky = np.zeros((4, 4), bool)
    sky[:2] = True
    exact = score(
        "image-segmentation",
        [{"segments": [_seg("sky", sky), _seg("road", ~sky)]}],
        [[_seg("sky", sky), _seg("road", ~sky)]],
    )
    assert exact["mean_iou"] == pytest.approx(1.0)
    assert exact["pixel_accuracy"] == pytest.approx(1.0)
    # predicted sky one row too low: sky predicted rows 1-2, gold rows 0-1 → intersection 4 px, union 12 → 1/3;
    # road predicted rows 0 and 3, gold rows 2-3 → intersection 4, union 12 → 1/3. Half the pixels are right.
    low = np.zeros((4, 4), bool)
    low[1:3] = True
    moved = score(
        "image-segmentation",
        [{"segments": [_seg("sky", low), _seg("road", ~low)]}],
        [[_seg("sky", sky), _seg("road", ~sky)]],
    )
    assert moved["per_class"]["sky"]["iou"] == pytest.approx(1 / 3)
    assert moved["mean_iou"] == pytest.approx(1 / 3)
    assert moved["pixel_accuracy"] == pytest.approx(0.5)
    # a class-index map as reference (0 = sky, 1 = road; 255 not scored)
    index = np.where(sky, 0, 1)
    index[3, 3] = 255
    as_index = score(
        "image-segmentation",
        [{"segments": [_seg("sky", sky), _seg("road", ~sky)]}],
        [index.tolist()],
        label_names=["sky", "road"],
    )
    assert as_index["mean_iou"] == pytest.approx(1.0)


def _depth(array):
    a = np.asarray(array, np.float32)
    return {
        "data": a.tobytes(),
        "dtype": "float32",
        "shape": list(a.shape),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def test_depth_delta1_and_abs_rel():
    truth = np.array([[1.0, 2.0], [4.0, 8.0]])
    # two pixels right, one 10% high (within 1.25), one twice too far (outside): δ1 = 3/4,
    # abs-rel = (0 + 0 + 0.1 + 1) / 4 = 0.275.
    guess = np.array([[1.0, 2.0], [4.4, 16.0]])
    result = score("depth-estimation", [{"depth": _depth(guess)}], [_depth(truth)])
    assert result["delta1"] == pytest.approx(0.75)
    assert result["abs_rel"] == pytest.approx(0.275, rel=1e-5)
    # nested lists as reference; a zero (invalid) reference pixel is not scored
    lists = score("depth-estimation", [{"depth": _depth(guess)}], [[[1.0, 2.0], [4.4, 0.0]]])
    assert lists["delta1"] == pytest.approx(1.0)
    assert lists["abs_rel"] == pytest.approx(0.0)


def test_translation_bleu_and_summarization_rouge():
    sentence = "the quick brown fox jumps over the lazy dog"
    assert score("translation", [{"translation_text": sentence}], [sentence])["bleu"] == pytest.approx(100.0)
    assert score("translation", [{"translation_text": "a b c d"}], [sentence])["bleu"] == pytest.approx(0.0)
    same = score("summarization", [{"summary_text": sentence}], [sentence])
    assert same["rougeL"] == pytest.approx(1.0)
    # LCS of "the cat sat" and "the cat ran" is 2 of 3 words → P = R = F = 2/3
    half = score("text-generation", [{"generated_text": "the cat sat"}], ["the cat ran"])
    assert half["rougeL"] == pytest.approx(2 / 3)


def test_registry_and_errors():
    assert {"text-classification", "token-classification", "question-answering", "object-detection"} <= set(
        METRICS
    )
    with pytest.raises(MetricsError, match="has no metrics; tasks with metrics:"):
        score("fill-mask", [{}], ["x"])
    with pytest.raises(MetricsError, match="2 predictions but 1 references"):
        score("text-classification", _labels("a", "b"), ["a"])
    with pytest.raises(MetricsError, match="nothing to score"):
        score("text-classification", [None], ["a"])
    with pytest.raises(MetricsError, match="no 'label' field"):
        score("text-classification", [{"text": "x"}], ["a"])
