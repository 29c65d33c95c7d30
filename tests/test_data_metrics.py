"""Metrics against values worked out by hand."""

import pytest

from switch_jax.data import metrics


def test_accuracy_counts_invalid_predictions_as_wrong():
  assert metrics.accuracy([1, 0, 1, 1], [1, 0, 0, -1]) == {"accuracy": 50.0}


def test_cb_mean_class_f1():
  targets = [0, 0, 1, 2, 2, 2]
  predictions = [0, 1, 1, 2, 2, 0]
  # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp1 fp1 fn0 -> 2/3; class 2: tp2 fp0 fn1 -> 0.8
  expected = 100 * (0.5 + 2 / 3 + 0.8) / 3
  assert metrics.mean_multiclass_f1(3)(targets, predictions) == {
      "mean_3class_f1": pytest.approx(expected)}


def test_binary_f1_and_matthews():
  targets, predictions = [1, 1, 0, 0, 1], [1, 1, 1, 0, -1]
  # tp 2, fp 1, fn 1 (the invalid -1 is a miss) -> F1 = 4 / 6
  assert metrics.f1_score_with_invalid(targets, predictions) == {"f1": pytest.approx(400 / 6)}
  # tp 2, tn 1, fp 1, fn 0 -> (2 - 0) / sqrt(3 * 2 * 2 * 1)
  value = metrics.matthews_corrcoef([1, 1, 0, 0], [1, 1, 1, 0])["matthews_corrcoef"]
  assert value == pytest.approx(100 * 2 / 12 ** 0.5)
  assert metrics.matthews_corrcoef([1, 1], [1, 1]) == {"matthews_corrcoef": 0.0}


def test_pearson_and_spearman_with_ties():
  assert metrics.pearson_corrcoef([1, 2, 3, 4], [1, 3, 2, 4]) == {
      "pearson_corrcoef": pytest.approx(80.0)}
  # x ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5)
  assert metrics.spearman_corrcoef([1, 2, 2, 3], [10, 20, 30, 40]) == {
      "spearman_corrcoef": pytest.approx(100 * 4.5 / 22.5 ** 0.5)}


def test_multirc_f1a_and_exact_match_by_question():
  targets = [{"group": (0, 0), "value": 1}, {"group": (0, 0), "value": 0},
             {"group": (0, 1), "value": 1}, {"group": (0, 1), "value": 1},
             {"group": (1, 2), "value": 0}]
  predictions = [{"value": 1}, {"value": 0}, {"value": 1}, {"value": 0}, {"value": 1}]
  # F1a over answers: tp 2, fp 1, fn 1 -> 2/3. Questions all-correct: only (0, 0) -> 1/3.
  assert metrics.multirc_f1_over_all_answers(targets, predictions) == {
      "f1": pytest.approx(200 / 3)}
  assert metrics.exact_match_by_group(targets, predictions) == {
      "exact_match": pytest.approx(100 / 3)}


def test_squad_normalization_and_max_over_answers():
  assert metrics.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
  result = metrics.squad([["the cat", "a dog"], ["New York City"]], ["Dog", "york"])
  # 1: exact match with "a dog". 2: EM 0; F1 precision 1, recall 1/3 -> 0.5.
  assert result == {"em": pytest.approx(50.0), "f1": pytest.approx(75.0)}


def test_record_deduplicates_the_copies_of_one_query():
  answers = ["Ann", "Ann B."]
  targets = [{"group": (5, 9), "value": answers}, {"group": (5, 9), "value": answers},
             {"group": (6, 1), "value": ["Bob"]}]
  predictions = [{"value": "ann"}, {"value": "ann"}, {"value": "Rob"}]
  assert metrics.record_squad(targets, predictions) == {"em": 50.0, "f1": 50.0}
