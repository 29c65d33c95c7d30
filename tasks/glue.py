"""GLUE as text to text (T5's `glue_*_v002` tasks, TFDS `glue/*:2.0.0`).

MNLI's matched/mismatched tasks hold its validation and test sets; `ax` is
the test-only diagnostic. STS-B's target is its score rounded to 0.2.
`glue_v002_proportional` samples by training-set size.
"""

import functools

import seqio
import tensorflow_datasets as tfds

from switch_jax.data import metrics, sources, text_to_text
from switch_jax.tasks import c4

TRAIN_EXAMPLES = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "qqp": 363846, "stsb": 5749,
                  "mnli": 392702, "qnli": 104743, "rte": 2490, "wnli": 635}
METRICS = {
    "cola": [metrics.matthews_corrcoef],
    "sst2": [metrics.accuracy],
    "mrpc": [metrics.f1_score_with_invalid, metrics.accuracy],
    "qqp": [metrics.f1_score_with_invalid, metrics.accuracy],
    "stsb": [metrics.pearson_corrcoef, metrics.spearman_corrcoef],
    "mnli": [metrics.accuracy],
    "mnli_matched": [metrics.accuracy],
    "mnli_mismatched": [metrics.accuracy],
    "qnli": [metrics.accuracy],
    "rte": [metrics.accuracy],
    "wnli": [metrics.accuracy],
    "ax": [],  # test labels are hidden
}

# Split names are fixed here so listing or mixing tasks never reads TFDS metadata.
_SPLITS = ["train", "validation", "test"]
SPLITS = {"mnli": ["train", "validation_matched", "validation_mismatched", "test_matched",
                   "test_mismatched"],
          "mnli_matched": ["validation", "test"], "mnli_mismatched": ["validation", "test"],
          "ax": ["test"]}


def task_name(name: str) -> str:
  return f"glue_{name}_v002"


_CONFIGS = tfds.text.glue.Glue.builder_configs
for _name in METRICS:
  if _name == "stsb":
    _text = [text_to_text.stsb]
    _postprocess = text_to_text.string_to_float
  else:
    _labels = tuple(_CONFIGS[_name].label_classes)
    _benchmark = "mnli" if _name.startswith("mnli") or _name == "ax" else _name
    _text = [functools.partial(text_to_text.glue, benchmark_name=_benchmark,
                               label_names=_labels)]
    _postprocess = functools.partial(text_to_text.string_label_to_class_id,
                                     label_classes=_labels)
  seqio.TaskRegistry.add(
      task_name(_name),
      source=sources.tfds_source(f"glue/{_name}:2.0.0", splits=SPLITS.get(_name, _SPLITS)),
      preprocessors=_text + [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                             seqio.preprocessors.append_eos_after_trim],
      output_features=c4.OUTPUT_FEATURES,
      postprocess_fn=_postprocess,
      metric_fns=METRICS[_name])

seqio.MixtureRegistry.add("glue_v002_proportional",
                          [(task_name(n), rate) for n, rate in TRAIN_EXAMPLES.items()])
