"""GLUE and SuperGLUE metrics in plain numpy, as seqio `metric_fns`.

Each takes `(targets, predictions)` (postprocessed, see `text_to_text.py`)
and returns `{name: value}` in percent, T5's reporting convention. A
prediction that matched no label is class -1 and counts as wrong.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Callable, Sequence

import numpy as np


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
  """Binary F1 of class 1; an invalid prediction (-1) counts as wrong."""
  return {"f1": 100.0 * _binary_f1(targets, predictions)}


def mean_multiclass_f1(num_classes: int) -> Callable:
  """Unweighted mean over classes of one-vs-rest F1 (CommitmentBank's F1)."""
  def metric(targets, predictions) -> dict:
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    scores = [_binary_f1(targets == c, predictions == c) for c in range(num_classes)]
    return {f"mean_{num_classes}class_f1": 100.0 * float(np.mean(scores))}
  return metric


def matthews_corrcoef(targets, predictions) -> dict:
  """Binary Matthews correlation; 0 when a row or column of the table is empty."""
  targets, predictions = np.asarray(targets) == 1, np.asarray(predictions) == 1
  tp = float(np.sum(targets & predictions))
  tn = float(np.sum(~targets & ~predictions))
  fp = float(np.sum(~targets & predictions))
  fn = float(np.sum(targets & ~predictions))
  denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  value = (tp * tn - fp * fn) / denominator if denominator else 0.0
  return {"matthews_corrcoef": 100.0 * value}


def _pearson(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  a, b = a - a.mean(), b - b.mean()
  denominator = np.sqrt(np.sum(a * a) * np.sum(b * b))
  return float(np.sum(a * b) / denominator) if denominator else 0.0


def _average_ranks(values) -> np.ndarray:
  """Ranks 1..n with ties sharing their mean rank (as Spearman needs)."""
  values = np.asarray(values, np.float64)
  order = np.argsort(values, kind="stable")
  ranks = np.empty(len(values))
  sorted_values = values[order]
  start = 0
  for end in range(1, len(values) + 1):
    if end == len(values) or sorted_values[end] != sorted_values[start]:
      ranks[order[start:end]] = (start + end + 1) / 2.0
      start = end
  return ranks


def pearson_corrcoef(targets, predictions) -> dict:
  return {"pearson_corrcoef": 100.0 * _pearson(targets, predictions)}


def spearman_corrcoef(targets, predictions) -> dict:
  return {"spearman_corrcoef":
          100.0 * _pearson(_average_ranks(targets), _average_ranks(predictions))}


# MultiRC: targets and predictions are {"group": question, "value": 0/1}.

def multirc_f1_over_all_answers(targets, predictions) -> dict:
  """F1a: binary F1 over every answer option of every question."""
  return {"f1": 100.0 * _binary_f1([t["value"] for t in targets],
                                   [p["value"] for p in predictions])}


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
