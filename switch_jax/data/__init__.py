"""Data: seqio sources, preprocessors, vocabularies and the trainer's batches.

- `pipeline.py`: `DatasetConfig`, `get_batches`, `get_eval_batches` (start here).
- `sources.py`: read-only TFDS and user text files, with clear errors.
- `preprocessors.py`, `noise.py`: span corruption, prefix LM, iid denoising.
- `text_to_text.py`, `metrics.py`: GLUE/SuperGLUE formats and scores.
- `vocabularies.py`: T5's vocabularies, loaded lazily, and training our own.
- `corpus.py`: the embedded corpus built from Python's standard library.

The tasks themselves are registered in `switch_jax.tasks` (`tasks/`).
"""
