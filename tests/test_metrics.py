"""Metric functions against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stillhouse import metrics as M


def test_normalize_prediction_takes_first_line():
    assert M.normalize_prediction("  HassTurnOn \nbecause the user asked") == "HassTurnOn"
    assert M.normalize_prediction("\n\n  label\n") == "label"
    assert M.normalize_prediction("") == ""


def test_accuracy():
    assert M.accuracy(["a", "b", "a", "c"], ["a", "b", "b", " c "]) == 0.75
    with pytest.raises(ValueError):
        M.accuracy(["a"], [])


def test_macro_f1_with_a_class_never_predicted():
    gold = ["a", "a", "b", "c"]
    pred = ["a", "a", "a", "b"]
    # a: tp 2 fp 1 fn 0 -> P 2/3, R 1, F1 0.8;  b: tp 0 fp 1 fn 1 -> 0;  c: never predicted -> 0
    assert M.macro_f1(gold, pred) == pytest.approx(0.8 / 3)
    per = M.per_class_prf(gold, pred)
    assert per["a"] == pytest.approx((2 / 3, 1.0, 0.8, 2))
    assert per["c"] == (0.0, 0.0, 0.0, 1)


def test_macro_f1_ignores_absent_classes_and_free_text_predictions():
    # "d" is a known label but neither expected nor predicted here: it says nothing and is left out.
    # "blah" is not a label: the answer is wrong, but it does not become a class of its own.
    gold, pred = ["a", "b"], ["a", "blah"]
    assert M.macro_f1(gold, pred, labels=["a", "b", "d"]) == pytest.approx((1.0 + 0.0) / 2)


def test_confusion_matrix_counts_outside_labels_last():
    m = M.confusion_matrix(["a", "a", "b", "b"], ["a", "b", "b", "zzz"], ["a", "b"])
    assert m == [[1, 1, 0], [0, 1, 1]]


def test_lcs_and_longest_common_substring():
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (BCBA)
    assert M.lcs_length([], [1]) == 0
    assert M.longest_common_substring(list("xabcdy"), list("zabcdw")) == 4
    assert M.longest_common_substring(list("abc"), list("xyz")) == 0


def test_rouge_l_on_known_strings():
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" = "the cat on the mat" (5 of 6 words each side)
    assert M.rouge_l_f1("the cat lay on the mat", "The cat sat on the mat.") == pytest.approx(5 / 6)
    # "cat the" vs "the cat": LCS 1 -> P = R = 1/2
    assert M.rouge_l_f1("cat the", "the cat") == pytest.approx(0.5)
    # P = 2/2, R = 2/4 -> F1 = 2/3
    assert M.rouge_l_f1("red door", "the red front door") == pytest.approx(2 / 3)
    assert M.rouge_l_f1("", "") == 1.0
    assert M.rouge_l_f1("x", "") == 0.0


def test_words_split_scripts_without_spaces_into_characters():
    assert M.words("Hello, World!") == ["hello", "world"]
    assert M.words("東京タワー is tall") == ["東", "京", "タ", "ワ", "ー", "is", "tall"]
    assert M.rouge_l_f1("東京です", "東京でした") == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))


def test_token_f1_counts_repeats_once_per_match():
    # common: "the" (min(2, 1) = 1) + "cat" = 2 of 3 predicted, 2 of 3 expected
    assert M.token_f1("the cat the", "the cat sat") == pytest.approx(2 / 3)
    assert M.token_f1("dog", "cat") == 0.0
    assert M.token_f1("", "") == 1.0


def test_field_counts_on_json_outputs():
    gold = '{"name": "Ann Lee", "city": "Bergen", "zip": "0150"}'
    pred = 'Here you go: {"name": "ann  lee", "city": "Oslo"} done'
    tp, fp, fn = M.field_counts(pred, gold)
    assert (tp, fp, fn) == (1, 1, 2)
    assert M.prf1(tp, fp, fn) == pytest.approx((0.5, 1 / 3, 0.4))
    assert M.field_counts("not json at all {", gold) == (0, 0, 3)
    # nested keys and lists: one pair per element
    assert M.field_counts('{"a": {"b": 1}, "tags": ["x", "y"]}', '{"a": {"b": "1"}, "tags": ["y"]}') == (2, 1, 0)


def test_prf1_zero_denominators():
    assert M.prf1(0, 0, 0) == (0.0, 0.0, 0.0)


def test_perplexity():
    assert M.perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    assert math.isnan(M.perplexity(1.0, 0))


def test_bootstrap_ci_contains_estimate_narrows_with_n_and_is_seeded():
    rng = np.random.default_rng(0)

    def width(n):
        x = (rng.random(n) < 0.7).astype(float)
        lo, hi = M.bootstrap_ci(n, lambda i: x[i].mean(), samples=500, seed=1)
        assert lo <= x.mean() <= hi
        return hi - lo

    small, large = width(30), width(3000)
    assert large < small / 4  # ~1/sqrt(n): 10x narrower for 100x the data
    x = np.arange(10.0)
    a = M.bootstrap_ci(10, lambda i: x[i].mean(), samples=100, seed=3)
    assert a == M.bootstrap_ci(10, lambda i: x[i].mean(), samples=100, seed=3)
    assert a != M.bootstrap_ci(10, lambda i: x[i].mean(), samples=100, seed=4)


def test_bootstrap_ci_edge_cases():
    assert M.bootstrap_ci(0, lambda i: 1.0) is None
    assert M.bootstrap_ci(5, lambda i: 1.0, samples=0) is None
    assert M.bootstrap_ci(5, lambda i: float("nan"), samples=20) is None
    assert M.bootstrap_ci(5, lambda i: 2.0, samples=20) == (2.0, 2.0)
