"""GLUE/SuperGLUE text-to-text formats and postprocessors, on hand-made records."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from switch_jax.data import text_to_text
from switch_jax.tasks import glue, super_glue


def _apply(preprocessors, records):
  ds = tf.data.Dataset.from_tensors(records[0])
  for record in records[1:]:
    ds = ds.concatenate(tf.data.Dataset.from_tensors(record))
  for preprocessor in preprocessors:
    ds = preprocessor(ds)
  return list(ds.as_numpy_iterator())


def _label(value):
  return tf.constant(value, tf.int64)


def test_rte_format_and_unknown_test_label():
  records = [{"premise": "A cat sat.", "hypothesis": "A cat exists.", "idx": 3,
              "label": _label(0)},
             {"premise": "P.", "hypothesis": "H.", "idx": 4, "label": _label(-1)}]
  labels = ("entailment", "not_entailment")
  out = _apply(super_glue.text_preprocessors("rte", labels), records)
  assert out[0]["inputs"] == b"rte hypothesis: A cat exists. premise: A cat sat."
  assert out[0]["targets"] == b"entailment" and out[0]["idx"] == 3
  assert out[1]["targets"] == b"<unk>"


def test_axb_is_phrased_as_rte():
  records = [{"sentence1": "S1.", "sentence2": "S2.", "idx": 0, "label": _label(1)}]
  out = _apply(super_glue.text_preprocessors("axb", ("entailment", "not_entailment")), records)
  assert out[0]["inputs"] == b"rte hypothesis: S2. premise: S1."
  assert out[0]["targets"] == b"not_entailment"


def test_multirc_order_html_and_ids():
  records = [{"paragraph": "Line one.<br>Some <b>bold</b> text.", "question": "Q?",
              "answer": "A.", "idx": {"paragraph": 1, "question": 7, "answer": 2},
              "label": _label(1)}]
  out = _apply(super_glue.text_preprocessors("multirc", ("False", "True")), records)[0]
  assert out["inputs"] == b"multirc question: Q? answer: A. paragraph: Line one. Some bold text."
  assert out["targets"] == b"True"
  assert (out["idx/paragraph"], out["idx/question"], out["idx/answer"]) == (1, 7, 2)


def test_wic_keeps_sentence_sentence_word_order():
  records = [{"sentence1": "He bats.", "sentence2": "Bats fly.", "word": "bat", "start1": 3,
              "start2": 0, "end1": 7, "end2": 4, "idx": 0, "label": _label(0)}]
  out = _apply(super_glue.text_preprocessors("wic", ("False", "True")), records)[0]
  assert out["inputs"] == b"wic sentence1: He bats. sentence2: Bats fly. word: bat"
  assert out["targets"] == b"False"


def test_record_one_example_per_answer_and_highlights():
  passage = "First fact.\n@highlight\nSecond fact\n@highlight\nThird"
  records = [
      {"passage": passage, "query": "Who is @placeholder?", "entities": ["Ann", "Bob"],
       "answers": ["Ann", "Ann B."], "idx": {"passage": 5, "query": 9}},
      {"passage": "P", "query": "Q", "entities": ["X"],
       "answers": tf.constant([], tf.string), "idx": {"passage": 6, "query": 1}},
  ]
  out = _apply([text_to_text.record], records)
  expected = (b"record query: Who is @placeholder? entities: Ann, Bob passage: "
              b"First fact. Second fact. Third")
  assert [ex["inputs"] for ex in out[:2]] == [expected, expected]
  assert [ex["targets"] for ex in out] == [b"Ann", b"Ann B.", b"<unk>"]
  assert out[1]["answers"].tolist() == [b"Ann", b"Ann B."]
  assert (out[0]["idx/passage"], out[0]["idx/query"]) == (5, 9)
  assert out[2]["answers"].tolist() == []


def test_wsc_marks_noun_and_pronoun():
  records = [{"text": "The city councilmen refused the demonstrators a permit because they "
                      "feared violence.",
              "span1_index": 0, "span1_text": "The city councilmen", "span2_index": 9,
              "span2_text": "they", "idx": 0, "label": _label(1)},
             {"text": "He said Mark was late.", "span1_index": 2, "span1_text": "Mark",
              "span2_index": 0, "span2_text": "He", "idx": 1, "label": _label(0)}]
  out = _apply(super_glue.text_preprocessors("wsc", ("False", "True")), records)
  assert out[0]["inputs"] == (b"wsc text: * The city councilmen * refused the demonstrators "
                              b"a permit because # they # feared violence.")
  assert out[0]["targets"] == b"True"
  assert out[1]["inputs"] == b"wsc text: # He # said * Mark * was late."


def test_stsb_rounds_to_a_fifth():
  records = [{"sentence1": "A", "sentence2": "B", "idx": 0, "label": tf.constant(3.14)},
             {"sentence1": "C", "sentence2": "D", "idx": 1, "label": tf.constant(2.57)},
             {"sentence1": "E", "sentence2": "F", "idx": 2, "label": tf.constant(0.0)}]
  out = _apply([text_to_text.stsb], records)
  assert out[0]["inputs"] == b"stsb sentence1: A sentence2: B"
  assert [ex["targets"] for ex in out] == [b"3.2", b"2.6", b"0.0"]


def test_glue_mnli_uses_mnli_prefix():
  labels = ("entailment", "neutral", "contradiction")
  records = [{"premise": "P", "hypothesis": "H", "idx": 0, "label": _label(2)}]
  task_preprocessors = seqio.get_mixture_or_task(glue.task_name("mnli_matched")).preprocessors
  out = _apply(task_preprocessors[:1], records)[0]
  assert out["inputs"] == b"mnli hypothesis: H premise: P"
  assert out["targets"] == labels[2].encode()


def test_postprocessors():
  classes = ("entailment", "not_entailment")
  assert text_to_text.string_label_to_class_id(b"not_entailment", classes) == 1
  assert text_to_text.string_label_to_class_id("maybe", classes) == -1
  assert text_to_text.string_to_float("3.4") == pytest.approx(3.4)
  assert text_to_text.string_to_float("n/a") == -1.0
  example = {"idx/paragraph": np.int32(2), "idx/question": np.int32(8)}
  assert text_to_text.multirc("True", example, is_target=True) == {"group": (2, 8), "value": 1}
  assert text_to_text.multirc("nonsense") == {"value": -1}
  example = {"idx/passage": np.int32(5), "idx/query": np.int32(9),
             "answers": np.array([b"Ann", b"Ann B."], dtype=object)}
  assert text_to_text.record_postprocess(b"Ann", example, is_target=True) == {
      "group": (5, 9), "value": ["Ann", "Ann B."]}
  assert text_to_text.record_postprocess(b"Bob") == {"value": "Bob"}
