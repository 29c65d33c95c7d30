"""mC4: `mc4.{lang}` span corruption for each language TFDS lists, and `mc4`.

Source: TFDS `c4/multilingual:3.0.1` (mT5's; current TFDS code builds only
3.1.0 but reads prepared 3.0.1 files), splits `{lang}` and
`{lang}-validation`; `-` in a language code becomes `_` in the task name
(`mc4.zh_Latn`). The `mc4` mixture samples language L at a rate
proportional to num_examples(L) ** 0.3 (temperature 1/0.3), which lifts
small languages.
"""

import seqio
from absl import logging
from tensorflow_datasets.text import c4 as tfds_c4

from switch_jax.data import preprocessors, sources, vocabularies

TFDS_NAME = "c4/multilingual:3.0.1"
LANGUAGES = tuple(tfds_c4.MC4_LANGUAGES)
TEMPERATURE = 1 / 0.3
VOCABULARY = vocabularies.LazyVocabulary(vocabularies.mc4_vocabulary_path, "mc4")
OUTPUT_FEATURES = vocabularies.text_output_features(VOCABULARY)


def task_name(language: str) -> str:
  return "mc4." + language.replace("-", "_")


def temperature_rate(task: seqio.Task, temperature: float = TEMPERATURE) -> float:
  """num_examples("train") ** (1 / temperature); 1.0 if the count is unknown."""
  try:
    num_examples = task.num_input_examples("train")
  except Exception:  # pylint: disable=broad-except
    num_examples = None  # dataset info without split sizes (e.g. TFDS mock data)
  if not num_examples:
    logging.warning("no example count for %s; sampling it at rate 1", task.name)
    return 1.0
  return float(num_examples) ** (1.0 / temperature)


for _language in LANGUAGES:
  seqio.TaskRegistry.add(
      task_name(_language),
      source=sources.tfds_source(
          TFDS_NAME, splits={"train": _language, "validation": f"{_language}-validation"}),
      preprocessors=preprocessors.objective_preprocessors("span_corruption"),
      output_features=OUTPUT_FEATURES,
      metric_fns=[])

seqio.MixtureRegistry.add("mc4", [task_name(lang) for lang in LANGUAGES],
                          default_rate=temperature_rate)
