"""C4 pretraining tasks, named as in T5.

`c4_v220_*` read TFDS `c4/en:2.2.0` (T5's data); `c4_*` read `c4/en:3.1.0`,
the version current TFDS builds. Each comes with three objectives:
`span_corruption` (use inputs 512 / targets 114), `prefix_lm` (targets =
inputs) and `iid_denoising` (targets >= 0.3 * inputs).
"""

import seqio

from switch_jax.data import preprocessors, sources, vocabularies

VOCABULARY = vocabularies.LazyVocabulary(vocabularies.c4_vocabulary_path, "c4")
OUTPUT_FEATURES = vocabularies.text_output_features(VOCABULARY)
TFDS_VERSIONS = {"c4_v220": "c4/en:2.2.0", "c4": "c4/en:3.1.0"}

for prefix, tfds_name in TFDS_VERSIONS.items():
  for objective in preprocessors.OBJECTIVES:
    seqio.TaskRegistry.add(
        f"{prefix}_{objective}",
        source=sources.tfds_source(tfds_name, splits=["train", "validation"]),
        preprocessors=preprocessors.objective_preprocessors(objective),
        output_features=OUTPUT_FEATURES,
        metric_fns=[])
