"""Pretraining with no download: `embedded_{span_corruption,prefix_lm,iid_denoising}`.

The corpus is the English prose of Python's standard library (see
`switch_jax/data/corpus.py` and docs/data.md), built and cached on first use
with its own 8000-piece vocabulary (+100 sentinels, 8100 ids).
"""

import seqio

from switch_jax.data import corpus, preprocessors, sources, vocabularies


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
