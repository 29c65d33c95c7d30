"""Pretraining on your own text: `local_{span_corruption,prefix_lm,iid_denoising}`.

Name the files in gin (one document per line; `.txt` plain text, or
`.jsonl`/`.json` with the text under `text_key`; `.gz` allowed):

    local_files.train = "/data/corpus/*.txt"
    local_files.validation = "/data/heldout.txt"   # optional

The vocabulary is the C4 one unless `local_vocabulary_path.path` is bound
(train one offline with `switch-jax vocab`). Files are checked when first
read: missing, empty or non-UTF-8 corpora are a `UserError`.
"""

from typing import Optional, Sequence, Union

import gin
import seqio

from switch_jax import errors
from switch_jax.data import preprocessors, sources, vocabularies

Patterns = Optional[Union[str, Sequence[str]]]


@gin.configurable
def local_files(train: Patterns = None, validation: Patterns = None,
                text_key: str = "text") -> dict:
  """The file patterns of each split, and the JSON key holding the text."""
  return {"train": train, "validation": validation, "text_key": text_key}


@gin.configurable
def local_vocabulary_path(path: Optional[str] = None) -> str:
  return path or vocabularies.c4_vocabulary_path()


def split_files(split: str) -> tuple:
  config = local_files()
  patterns = config.get(split)
  if not patterns:
    raise errors.SplitNotBoundError(
        f"the local tasks read files you name, and none are bound for split {split!r}: "
        f"add the gin binding `local_files.{split} = '/path/to/*.txt'` (one document per "
        "line; .jsonl files use their 'text' field)")
  patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
  return sources.checked_text_files(patterns, config["text_key"])


def _text_key() -> str:
  return local_files()["text_key"]


VOCABULARY = vocabularies.LazyVocabulary(local_vocabulary_path, "local")

for _objective in preprocessors.OBJECTIVES:
  seqio.TaskRegistry.add(
      f"local_{_objective}",
      source=sources.TextFilesSource(split_files, text_key=_text_key),
      preprocessors=preprocessors.objective_preprocessors(_objective),
      output_features=vocabularies.text_output_features(VOCABULARY),
      metric_fns=[])
