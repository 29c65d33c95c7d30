"""Test setup: 8 emulated CPU devices, set once before any JAX backend starts."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The modules with subprocess runs and training loops go first: under
# `pytest -n 2` their long tests then overlap each other, instead of one
# worker finishing them alone while the other idles.
_LONG_MODULES = ("test_pod_simulation.py", "test_hosts_fail_apart.py", "test_buckets.py", "test_trainer.py", "test_reliability.py",
                 "test_warm_start.py", "test_mesh.py")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.path.name not in _LONG_MODULES)


WORDS = ("expert router token capacity layer model train batch switch sparse dense group "
         "gate loss step shard mesh device parallel tensor weight gradient update")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """(folder with train.txt and validation.txt, SentencePiece model path):
  a small made-up corpus and a 120-piece (+100 sentinels) vocabulary."""
  from switch_jax.data import vocabularies  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = WORDS.split()
  lines = [" ".join(rng.choice(words, size=rng.integers(8, 40))) + "." for _ in range(600)]
  (root / "train.txt").write_text("\n".join(lines[:500]) + "\n")
  (root / "validation.txt").write_text("\n".join(lines[500:]) + "\n")
  vocab = vocabularies.train_sentencepiece([str(root / "train.txt")], 120, str(root / "vocab"))
  return root, vocab.sentencepiece_model_file
