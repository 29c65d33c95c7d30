"""Metrics against values worked out by hand."""

import numpy as np
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


def test_f1_counts_an_invalid_prediction_as_the_opposite_of_its_target():
  # T5: invalid -> 1 - target, so [1, 0, 1, 1, 0]: tp 1, fp 2, fn 1 -> 2 / 5.
  assert metrics.f1_score_with_invalid([1, 1, 0, 0, 0], [1, -1, -1, -1, 0]) == {
      "f1": pytest.approx(40.0)}
  # Only negative targets invalid: each a false positive, tp 1, fp 1 -> 2 / 3.
  assert metrics.f1_score_with_invalid([0, 1, 0], [-1, 1, 0]) == {"f1": pytest.approx(200 / 3)}
  assert metrics.f1_score_with_invalid([0, 0], [-1, 0]) == {"f1": 0.0}
  multirc = metrics.multirc_f1_over_all_answers(
      [{"group": 0, "value": 0}, {"group": 0, "value": 1}], [{"value": -1}, {"value": 1}])
  assert multirc == {"f1": pytest.approx(200 / 3)}


def test_matthews_passes_invalid_predictions_as_a_third_class():
  # Classes -1, 0, 1: targets 0 x3, 1 x2; predictions -1 x3, 0 x1, 1 x1; 2 right of 5.
  # (2 * 5 - (3 * 1 + 2 * 1)) / sqrt((25 - 13) * (25 - 11)) = 5 / sqrt(168).
  value = metrics.matthews_corrcoef([1, 1, 0, 0, 0], [1, -1, -1, -1, 0])["matthews_corrcoef"]
  assert value == pytest.approx(100 * 5 / 168 ** 0.5)
  assert metrics.matthews_corrcoef([0, 0, 1], [-1, -1, -1]) == {"matthews_corrcoef": 0.0}


def test_matthews_equals_the_correlation_of_one_hot_labels():
  # The K-class coefficient is the correlation of the one-hot label matrices.
  rng = np.random.default_rng(0)
  targets, predictions = rng.integers(0, 2, 40), rng.integers(-1, 2, 40)
  classes = [-1, 0, 1]
  x = np.stack([targets == c for c in classes], 1).astype(float)
  y = np.stack([predictions == c for c in classes], 1).astype(float)
  x, y = x - x.mean(0), y - y.mean(0)
  expected = 100 * np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))
  assert metrics.matthews_corrcoef(targets, predictions)["matthews_corrcoef"] == (
      pytest.approx(expected))


def test_correlations_of_a_constant_prediction_are_undefined():
  # As scipy (and so T5) reports them: NaN, not a correlation of 0.
  assert np.isnan(metrics.pearson_corrcoef([1.0, 2.0, 3.0], [2.5, 2.5, 2.5])["pearson_corrcoef"])
  assert np.isnan(metrics.spearman_corrcoef([1.0, 2.0, 3.0], [2.5, 2.5, 2.5])[
      "spearman_corrcoef"])


def test_pearson_and_spearman_with_ties():
  assert metrics.pearson_corrcoef([1, 2, 3, 4], [1, 3, 2, 4]) == {
      "pearson_corrcoef": pytest.approx(80.0)}
  # x ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5)
  assert metrics.spearman_corrcoef([1, 2, 2, 3], [10, 20, 30, 40]) == {
      "spearman_corrcoef": pytest.approx(100 * 4.5 / 22.5 ** 0.5)}
  # Ties on both sides: ranks [1.5, 1.5, 3, 4] and [1, 3, 3, 3] -> 2 / sqrt(4.5 * 3).
  assert metrics.spearman_corrcoef([1, 1, 2, 3], [1, 2, 2, 2]) == {
      "spearman_corrcoef": pytest.approx(100 * 2 / 13.5 ** 0.5)}


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
