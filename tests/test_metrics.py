"""Metrics against values computed by hand."""

import pytest

from emorec.metrics import classification_metrics


def test_hand_computed():
    # gold a a b b c c c; one prediction (-1) names no label and counts as wrong.
    golds = [0, 1, 1, 2, 2, 0, 2]
    preds = [0, 0, 1, 2, 1, -1, 2]
    m = classification_metrics(preds, golds, ["a", "b", "c"])
    # a: tp1 fp1 fn1 -> F1 1/2, recall 1/2; b: tp1 fp1 fn1 -> 1/2, 1/2; c: tp2 fp0 fn1 -> 4/5, 2/3
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["f1_per_class"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.8})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 0.8) / 3)
    assert m["weighted_f1"] == pytest.approx((2 * 0.5 + 2 * 0.5 + 3 * 0.8) / 7)
    assert m["ua"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert m["invalid"] == 1 and m["n"] == 7


def test_perfect_and_absent_class():
    m = classification_metrics([0, 1, 1], [0, 1, 1], ["x", "y", "z"])
    assert m["accuracy"] == 1.0 and m["weighted_f1"] == pytest.approx(1.0)
    # z has no gold and no prediction: it scores 0 and still counts in the macro mean.
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_micro_f1_without_neutral():
    # neutral = 0. Emotion hits: (1,1) and (2,2) = 2; predicted emotions 1,1,2 = 3 (the invalid
    # prediction names none); gold emotions 1,1,2,2 = 4. Micro F1 = 2*2 / (3 + 4).
    golds = [0, 1, 1, 2, 0, 2]
    preds = [1, 1, 0, 2, 0, -1]
    m = classification_metrics(preds, golds, ["neutral", "x", "y"], neutral=0)
    assert m["micro_f1_no_neutral"] == pytest.approx(4 / 7)
    assert "micro_f1_no_neutral" not in classification_metrics(preds, golds, ["neutral", "x", "y"])
    # All neutral, predicted neutral: no emotion anywhere, nothing to score.
    assert classification_metrics([0, 0], [0, 0], ["neutral", "x"], neutral=0)["micro_f1_no_neutral"] == 0.0
