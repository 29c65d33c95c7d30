"""GLUE and SuperGLUE metrics in plain numpy, as seqio `metric_fns`.

Each takes `(targets, predictions)` (postprocessed, see `text_to_text.py`)
and returns `{name: value}` in percent, T5's reporting convention. A
prediction that matched no label is class -1 and counts as wrong, the way
T5's metrics (t5/evaluation/metrics.py) count it: binary F1 scores it as
the opposite of its target, Matthews correlation as a class of its own.

The definitions follow T5's published code (Apache-2.0) in
`t5.evaluation.metrics`: `accuracy`, `f1_score_with_invalid`,
`mean_multiclass_f1`, `pearson_corrcoef`, `spearman_corrcoef`,
`multirc_f1_over_all_answers`, `mean_group_metric(all_match)` (our
`exact_match_by_group`), `squad` with `t5.evaluation.qa_utils` (answer
normalization, token F1) and `deduplicate_metric(squad)` for ReCoRD;
Matthews correlation is sklearn's, which T5's GLUE tasks wrap.
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from typing import Callable, Sequence

import numpy as np
import scipy.stats


def accuracy(targets, predictions) -> dict:
  return {"accuracy": 100.0 * float(np.mean(np.asarray(targets) == np.asarray(predictions)))}


def _f1(true_positive, false_positive, false_negative) -> float:
  denominator = 2 * true_positive + false_positive + false_negative
  return 2.0 * true_positive / denominator if denominator else 0.0


def _binary_f1(targets, predictions) -> float:
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  tp = np.sum((predictions == 1) & (targets == 1))
  fp = np.sum((predictions == 1) & (targets != 1))
  fn = np.sum((predictions != 1) & (targets == 1))
  return _f1(tp, fp, fn)


def f1_score_with_invalid(targets, predictions) -> dict:
  """Binary F1 of class 1; an invalid prediction (neither 0 nor 1) is wrong
  whatever the target: a false negative on a 1, a false positive on a 0."""
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  invalid = (predictions != 0) & (predictions != 1)
  return {"f1": 100.0 * _binary_f1(targets, np.where(invalid, 1 - targets, predictions))}


def mean_multiclass_f1(num_classes: int) -> Callable:
  """Unweighted mean over classes of one-vs-rest F1 (CommitmentBank's F1);
  an invalid prediction is a miss of its target's class and no other's."""
  def metric(targets, predictions) -> dict:
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    scores = [_binary_f1(targets == c, predictions == c) for c in range(num_classes)]
    return {f"mean_{num_classes}class_f1": 100.0 * float(np.mean(scores))}
  return metric


def matthews_corrcoef(targets, predictions) -> dict:
  """Matthews correlation over every class that occurs, an invalid
  prediction (-1) being one more class (the K-class form, Gorodkin 2004,
  which is the usual binary one for two classes); 0 when the targets or
  the predictions are all one class."""
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  classes = np.union1d(targets, predictions)
  true_counts = np.array([np.sum(targets == c) for c in classes], np.float64)
  predicted_counts = np.array([np.sum(predictions == c) for c in classes], np.float64)
  samples, correct = float(len(targets)), float(np.sum(targets == predictions))
  covariance = correct * samples - true_counts @ predicted_counts
  true_spread = samples ** 2 - true_counts @ true_counts
  predicted_spread = samples ** 2 - predicted_counts @ predicted_counts
  denominator = np.sqrt(true_spread * predicted_spread)
  return {"matthews_corrcoef": 100.0 * (covariance / denominator if denominator else 0.0)}


def _correlation(function, targets, predictions) -> float:
  """scipy's coefficient; NaN (as in T5) when either side is constant."""
  with warnings.catch_warnings():  # constant input: NaN is the answer, not news
    warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
    return float(function(np.asarray(targets, np.float64),
                          np.asarray(predictions, np.float64))[0])


def pearson_corrcoef(targets, predictions) -> dict:
  return {"pearson_corrcoef": 100.0 * _correlation(scipy.stats.pearsonr, targets, predictions)}


def spearman_corrcoef(targets, predictions) -> dict:
  """Spearman's rho: Pearson's on ranks, tied values sharing their mean rank."""
  return {"spearman_corrcoef":
          100.0 * _correlation(scipy.stats.spearmanr, targets, predictions)}


# MultiRC: targets and predictions are {"group": question, "value": 0/1}.

def multirc_f1_over_all_answers(targets, predictions) -> dict:
  """F1a: binary F1 over every answer option of every question, an invalid
  answer counted wrong as in `f1_score_with_invalid`."""
  return f1_score_with_invalid([t["value"] for t in targets], [p["value"] for p in predictions])


def exact_match_by_group(targets, predictions) -> dict:
  """Percent of groups (MultiRC questions) whose every answer is right."""
  correct = collections.defaultdict(lambda: True)
  for target, prediction in zip(targets, predictions):
    correct[target["group"]] &= target["value"] == prediction["value"]
  return {"exact_match": 100.0 * float(np.mean(list(correct.values())))}


# ReCoRD and other extractive answers: SQuAD's normalization and token F1.

_PUNCTUATION = frozenset(string.punctuation)

def normalize_answer(text: str) -> str:
  """Lowercase, drop punctuation and the articles a/an/the, squeeze spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _token_f1(prediction: str, target: str) -> float:
  pred_tokens, target_tokens = prediction.split(), target.split()
  common = collections.Counter(pred_tokens) & collections.Counter(target_tokens)
  overlap = sum(common.values())
  if overlap == 0:
    return 0.0
  precision, recall = overlap / len(pred_tokens), overlap / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict:
  """Exact match and token F1, each the max over a question's gold answers."""
  em, f1 = [], []
  for answers, prediction in zip(targets, predictions):
    prediction = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in answers]
    em.append(max(float(prediction == a) for a in answers))
    f1.append(max(_token_f1(prediction, a) for a in answers))
  return {"em": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


def record_squad(targets, predictions) -> dict:
  """ReCoRD: one score per (passage, query); its copies (one per answer) collapse."""
  seen = {}
  for target, prediction in zip(targets, predictions):
    seen.setdefault(target["group"], (target["value"], prediction["value"]))
  answers, guesses = zip(*seen.values())
  return squad(answers, guesses)
