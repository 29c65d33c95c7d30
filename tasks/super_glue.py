"""SuperGLUE v1.0.2 as text to text (T5's `super_glue_*_v102` tasks).

Inputs name the task and each feature in alphabetical order (T5's format,
e.g. `"cb hypothesis: ... premise: ..."`); MultiRC and WiC fix their order.
WSC reads the corrected `wsc.fixed` data and asks whether the marked pronoun
refers to the marked noun. `axb` and `axg` are test-only diagnostics.
`super_glue_v102_proportional` samples by training-set size.
"""

import functools

import seqio
import tensorflow_datasets as tfds

from switch_jax.data import metrics, sources, text_to_text
from switch_jax.tasks import c4

# Training examples per task: the mixture's rates.
TRAIN_EXAMPLES = {"boolq": 9427, "cb": 250, "copa": 400, "multirc": 27243,
                  "record": 138854, "rte": 2490, "wic": 5428, "wsc": 259}
METRICS = {
    "boolq": [metrics.accuracy],
    "cb": [metrics.mean_multiclass_f1(num_classes=3), metrics.accuracy],
    "copa": [metrics.accuracy],
    "multirc": [metrics.multirc_f1_over_all_answers, metrics.exact_match_by_group],
    "record": [metrics.record_squad],
    "rte": [metrics.accuracy],
    "wic": [metrics.accuracy],
    "wsc": [metrics.accuracy],
    "axb": [metrics.matthews_corrcoef],
    "axg": [metrics.accuracy],
}
FEATURE_ORDER = {"multirc": ("question", "answer", "paragraph"),
                 "wic": ("sentence1", "sentence2", "word")}
TFDS_CONFIG = {"wsc": "wsc.fixed"}


def task_name(name: str) -> str:
  return f"super_glue_{name}_v102"


def text_preprocessors(name: str, label_names) -> list:
  if name == "record":
    return [text_to_text.record]
  if name == "wsc":
    return [functools.partial(text_to_text.wsc, label_names=label_names)]
  rekey = []
  if name == "axb":  # the RTE-style diagnostic names its sentences differently
    rekey = [functools.partial(seqio.preprocessors.rekey, key_map={
        "premise": "sentence1", "hypothesis": "sentence2", "label": "label", "idx": "idx"})]
  benchmark = "rte" if name in ("axb", "axg") else name
  return rekey + [functools.partial(text_to_text.glue, benchmark_name=benchmark,
                                    label_names=label_names,
                                    feature_names=FEATURE_ORDER.get(name))]


def postprocessor(name: str, label_names):
  if name == "multirc":
    return text_to_text.multirc
  if name == "record":
    return text_to_text.record_postprocess
  return functools.partial(text_to_text.string_label_to_class_id,
                           label_classes=tuple(label_names))


_CONFIGS = tfds.text.super_glue.SuperGlue.builder_configs
for _name in METRICS:
  _config = TFDS_CONFIG.get(_name, _name)
  _labels = tuple(_CONFIGS[_config].label_classes)
  seqio.TaskRegistry.add(
      task_name(_name),
      source=sources.tfds_source(
          f"super_glue/{_config}:1.0.2",
          splits=["test"] if _name in ("axb", "axg") else ["train", "validation", "test"]),
      preprocessors=text_preprocessors(_name, _labels) + [
          seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim],
      output_features=c4.OUTPUT_FEATURES,
      postprocess_fn=postprocessor(_name, _labels),
      metric_fns=METRICS[_name])

seqio.MixtureRegistry.add("super_glue_v102_proportional",
                          [(task_name(n), rate) for n, rate in TRAIN_EXAMPLES.items()])
