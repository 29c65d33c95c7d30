"""Tasks with no download: pretraining (`embedded_{span_corruption,prefix_lm,
iid_denoising}`) and a SuperGLUE-style fine-tuning task (`embedded_continuation`).

The corpus is the English prose of Python's standard library (see
`switch_jax/data/corpus.py` and docs/data.md), built and cached on first use
with its own 8000-piece vocabulary (+100 sentinels, 8100 ids).
"""

import functools

import seqio
import tensorflow as tf

from switch_jax.data import continuation, corpus, metrics, preprocessors, sources
from switch_jax.data import text_to_text, vocabularies


def split_files(split: str) -> tuple:
  built = corpus.embedded_corpus()
  files = {"train": built.train_files, "validation": built.validation_files}[split]
  return sources.checked_text_files(tuple(files))


VOCABULARY = vocabularies.LazyVocabulary(corpus.embedded_vocabulary_path, "embedded")
OUTPUT_FEATURES = vocabularies.text_output_features(VOCABULARY)

for _objective in preprocessors.OBJECTIVES:
  seqio.TaskRegistry.add(
      f"embedded_{_objective}",
      source=sources.TextFilesSource(split_files),
      preprocessors=preprocessors.objective_preprocessors(_objective),
      output_features=OUTPUT_FEATURES,
      metric_fns=[])


def continuation_dataset(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
  del shuffle_files, seed  # one in-memory table per split; the pipeline shuffles examples
  built = corpus.embedded_corpus()
  files = continuation.split_files(split, built.train_files, built.validation_files)
  return tf.data.Dataset.from_tensor_slices(
      continuation.make_examples(continuation.read_split(files)))


seqio.TaskRegistry.add(
    "embedded_continuation",
    source=seqio.FunctionDataSource(continuation_dataset, splits=("train", "validation")),
    preprocessors=[
        functools.partial(text_to_text.glue, benchmark_name="continuation",
                          label_names=continuation.LABEL_NAMES),
        seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
        seqio.preprocessors.append_eos_after_trim],
    output_features=OUTPUT_FEATURES,
    postprocess_fn=functools.partial(text_to_text.string_label_to_class_id,
                                     label_classes=continuation.LABEL_NAMES),
    metric_fns=[metrics.accuracy])
