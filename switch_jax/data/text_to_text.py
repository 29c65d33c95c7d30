"""GLUE and SuperGLUE as text to text: preprocessors and postprocessors.

Each example becomes `"<benchmark> <feature>: <text> ..."` with the label's
name as the target (T5's format), e.g.
`"rte premise: ... hypothesis: ..."` -> `"not_entailment"`. Special cases:
MultiRC (question, answer, paragraph order; HTML removed; ids kept for
grouping), ReCoRD (one example per answer; the answers kept for the
max-over-answers metric), WSC (candidate and pronoun marked in the text),
STS-B (the score rounded to 0.2, as text).

Postprocessors turn decoded strings back into what `metrics.py` compares:
class ids, floats, or `{"group": ..., "value": ...}` records.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

UNKNOWN_LABEL = "<unk>"


def _label_name(label, label_names):
  # Test splits carry label -1; their target is a placeholder, never scored.
  return tf.cond(tf.equal(label, -1), lambda: tf.constant(UNKNOWN_LABEL),
                 lambda: tf.gather(tf.constant(list(label_names)), label))


@seqio.map_over_dataset
def glue(x, benchmark_name: str, label_names: Sequence[str],
         feature_names: Optional[Sequence[str]] = None):
  """`"<benchmark> k1: v1 k2: v2 ..."` -> label name.

  `feature_names` fixes the order; by default the string features sorted by
  name. Keeps `idx` (MultiRC: `idx/paragraph`, `idx/question`, `idx/answer`).
  """
  x = dict(x)
  keys = feature_names or sorted(k for k in x if k not in ("label", "idx"))
  out = {}
  if benchmark_name == "multirc":
    x["paragraph"] = tf.strings.regex_replace(x["paragraph"], "<br>", " ")
    x["paragraph"] = tf.strings.regex_replace(x["paragraph"], "<(/)?b>", "")
    for part in ("paragraph", "question", "answer"):
      out[f"idx/{part}"] = x["idx"][part]
  elif "idx" in x:
    out["idx"] = x["idx"]
  pieces = [benchmark_name]
  for key in keys:
    pieces += [f"{key}:", x[key]]
  out["inputs"] = tf.strings.join(pieces, separator=" ")
  out["targets"] = _label_name(x["label"], label_names)
  return out


@seqio.map_over_dataset
def stsb(x):
  """STS-B: the 0-5 similarity score, rounded to 0.2, is the target text."""
  inputs = tf.strings.join(
      ["stsb sentence1:", x["sentence1"], "sentence2:", x["sentence2"]], separator=" ")
  score = tf.round(tf.cast(x["label"], tf.float32) * 5.0) / 5.0
  return {"inputs": inputs, "targets": tf.strings.as_string(score, precision=1),
          "idx": x["idx"]}


def record(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """ReCoRD: one example per gold answer (test examples get one `<unk>`).

  Inputs: `"record query: ... entities: e1, e2 passage: ..."`. Every copy keeps
  `answers` and the ids, so the metric can deduplicate and take the best
  answer.
  """
  def _expand(x):
    passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    inputs = tf.strings.join(
        ["record query:", x["query"], "entities:",
         tf.strings.reduce_join(x["entities"], separator=", "), "passage:", passage],
        separator=" ")
    answers = x["answers"]
    targets = tf.cond(tf.size(answers) > 0, lambda: answers,
                      lambda: tf.constant([UNKNOWN_LABEL]))
    copies = tf.size(targets)
    return {
        "inputs": tf.fill([copies], inputs),
        "targets": targets,
        "answers": tf.tile(answers[tf.newaxis], [copies, 1]),
        "idx/passage": tf.fill([copies], x["idx"]["passage"]),
        "idx/query": tf.fill([copies], x["idx"]["query"]),
    }

  return dataset.map(_expand, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _mark_words(words, start, num_words, mark):
  """Puts `mark` before and after words[start:start + num_words]."""
  end = tf.minimum(start + num_words, tf.size(words))
  return tf.concat([words[:start], [mark], words[start:end], [mark], words[end:]], axis=0)


@seqio.map_over_dataset
def wsc(x, label_names: Sequence[str] = ("False", "True")):
  """WSC as classification: does the pronoun (#...#) refer to the noun (*...*)?

  Span indices count whitespace-separated words, as in the SuperGLUE data.
  """
  words = tf.strings.split(x["text"], sep=" ")
  span1_len = tf.size(tf.strings.split(x["span1_text"], sep=" "))
  span2_len = tf.size(tf.strings.split(x["span2_text"], sep=" "))
  i1, i2 = tf.cast(x["span1_index"], tf.int32), tf.cast(x["span2_index"], tf.int32)
  # Mark the later span first so the earlier index stays valid.
  words = tf.cond(
      i1 > i2,
      lambda: _mark_words(_mark_words(words, i1, span1_len, "*"), i2, span2_len, "#"),
      lambda: _mark_words(_mark_words(words, i2, span2_len, "#"), i1, span1_len, "*"))
  inputs = tf.strings.join(["wsc text:", tf.strings.reduce_join(words, separator=" ")],
                           separator=" ")
  return {"inputs": inputs, "targets": _label_name(x["label"], label_names),
          "idx": x["idx"]}


# Postprocessors: (decoded string, example, is_target) -> what metrics compare.

def _text(value) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def string_label_to_class_id(string_label, label_classes: Sequence[str], example=None,
                             is_target=False) -> int:
  """Index of the label in `label_classes`, or -1 for anything else."""
  del example, is_target
  string_label = _text(string_label).strip()
  return label_classes.index(string_label) if string_label in label_classes else -1


def string_to_float(string, default: float = -1.0, example=None, is_target=False) -> float:
  del example, is_target
  try:
    return float(_text(string))
  except ValueError:
    return default


def multirc(string_label, example=None, is_target=False) -> dict:
  """Targets carry their question's group for exact match per question."""
  value = string_label_to_class_id(string_label, ("False", "True"))
  if not is_target:
    return {"value": value}
  group = (int(np.asarray(example["idx/paragraph"])), int(np.asarray(example["idx/question"])))
  return {"group": group, "value": value}


def record_postprocess(answer, example=None, is_target=False) -> dict:
  """Targets become all gold answers of their (passage, query) group."""
  if not is_target:
    return {"value": _text(answer)}
  return {"group": (int(np.asarray(example["idx/passage"])),
                    int(np.asarray(example["idx/query"]))),
          "value": [_text(a) for a in np.asarray(example["answers"]).tolist()]}
