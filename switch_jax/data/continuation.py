"""A SuperGLUE-style sentence-pair task made from the embedded corpus.

`embedded_continuation` asks, RTE-style, whether `sentence2` is the sentence
that follows `sentence1` in its document ("True") or that sentence with its
words shuffled ("False"). It needs no download, so fine-tuning can be run
and tested anywhere; experiments/05_finetune uses it.

Examples are made deterministically from the corpus's files: every document
with two sentences of at least `MIN_WORDS` words gives one pair; about half
of the pairs (chosen by a hash of the first sentence) get a second sentence
whose words are shuffled (a fixed permutation seeded by that hash). It is
easy on purpose: word order alone decides, so any model that reads its input
can learn it (the negatives of a first version, the second sentence of
another document, asked for more). The corpus's validation file alone gives
only ~150 pairs, so this task's validation split also takes the first of the
corpus's 8 train shards (~1,000 pairs in all) and trains on the other 7
(~5,900 pairs). Pretraining on the corpus has read those documents, as a
pretrained model has read the web text of GLUE's sources; it has never seen
the pairs or their labels.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Iterable, Optional, Sequence

from switch_jax.data import sources

MIN_WORDS = 4
LABEL_NAMES = ("False", "True")
# A sentence ends at . ! or ? followed by whitespace and a capital letter.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def first_two_sentences(document: str) -> Optional[tuple[str, str]]:
  """The document's first two sentences, if both have MIN_WORDS words."""
  sentences = _SENTENCE_END.split(document.strip(), maxsplit=2)
  if len(sentences) < 2:
    return None
  first, second = sentences[0].strip(), sentences[1].strip()
  if len(first.split()) < MIN_WORDS or len(second.split()) < MIN_WORDS:
    return None
  return first, second


def _is_negative(sentence: str) -> bool:
  return hashlib.sha256(sentence.encode("utf-8")).digest()[0] % 2 == 0


def shuffled(sentence: str, key: str) -> str:
  """The sentence's words in a fixed pseudo-random order other than their own
  (unchanged only when every order reads the same, e.g. "a a a a")."""
  words = sentence.split()
  seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
  order = random.Random(seed).sample(range(len(words)), len(words))
  if order == sorted(order):  # the identity: rotate by one instead
    order = order[1:] + order[:1]
  return " ".join(words[i] for i in order)


def make_examples(documents: Iterable[str]) -> dict[str, list]:
  """Columns `sentence1`, `sentence2`, `label` (1: the real next sentence), `idx`."""
  pairs = [p for p in map(first_two_sentences, documents) if p is not None]
  columns: dict[str, list] = {"sentence1": [], "sentence2": [], "label": [], "idx": []}
  for i, (first, second) in enumerate(pairs):
    candidate = shuffled(second, first) if _is_negative(first) else second
    columns["sentence1"].append(first)
    columns["sentence2"].append(candidate)
    columns["label"].append(int(candidate == second))
    columns["idx"].append(i)
  return columns


def read_split(files: Sequence[str]) -> list[str]:
  documents = []
  for path in files:
    documents.extend(sources.read_documents(path))
  return documents


def split_files(split: str, train_files: Sequence[str],
                validation_files: Sequence[str]) -> list[str]:
  """The corpus files of this task's `split` (see the module docstring)."""
  if split == "train":
    return list(train_files[1:])
  if split == "validation":
    return [*validation_files, train_files[0]]
  raise ValueError(f"embedded_continuation has splits 'train' and 'validation', not {split!r}")
