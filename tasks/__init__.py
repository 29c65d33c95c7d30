"""seqio tasks and mixtures, registered on import (`import switch_jax.tasks`).

Registration reads no data and loads no vocabulary: sources and
vocabularies are resolved when a dataset is first built.

- `c4.py`: C4 span corruption, prefix LM and iid denoising (TFDS c4/en).
- `mc4.py`: `mc4.{lang}` for every mC4 language and the `mc4` mixture.
- `super_glue.py`, `glue.py`: the text-to-text benchmarks and their mixtures.
- `local.py`: pretraining on the user's own text or JSON-lines files.
- `embedded.py`: pretraining on the corpus built from Python's stdlib.
"""

from switch_jax.tasks import c4  # noqa: F401
from switch_jax.tasks import embedded  # noqa: F401
from switch_jax.tasks import glue  # noqa: F401
from switch_jax.tasks import local  # noqa: F401
from switch_jax.tasks import mc4  # noqa: F401
from switch_jax.tasks import super_glue  # noqa: F401
