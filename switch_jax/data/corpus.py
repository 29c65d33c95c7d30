"""The embedded default corpus: the English prose in Python's standard library.

Every machine that runs this package has the standard library's source, so
the quickstart can pretrain with no download. The corpus is built on first
use, deterministically, from the `.py` files under `sysconfig`'s stdlib
directory (site-packages excluded), parsed with `ast` and never imported:

- every module, class and function docstring;
- every block of consecutive full-line `#` comments (not inside strings);
- the help topics of `pydoc_data/topics.py` (the language reference).

Each document is whitespace-normalized to one line; documents under 4 words
are dropped and exact duplicates keep their first occurrence (files in
sorted path order). A hash of each document puts about 2% in validation and
spreads the rest over 8 shuffled train shards. A SentencePiece vocabulary
(8000 pieces + 100 extra ids) is trained on the train split. Everything goes
to `<cache>/embedded_corpus/<fingerprint>/`, where the fingerprint covers the
Python version and the stdlib file list, so a different Python gets its own
(different) corpus. Python 3.11.7: 34.6k documents, 1.15M tokens; about 20 s
to build on 2 cores (docs/data.md).
"""

from __future__ import annotations

import ast
import dataclasses
import gc
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from typing import Optional

import gin

from switch_jax import storage

FORMAT_VERSION = 1
NUM_TRAIN_SHARDS = 8
VALIDATION_PERCENT = 2
MIN_WORDS = 4
DEFAULT_VOCAB_SIZE = 8000
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TOPICS_FILE = os.path.join("pydoc_data", "topics.py")


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpus:
  directory: str
  train_files: tuple[str, ...]
  validation_files: tuple[str, ...]
  vocabulary_file: str
  stats: dict


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def python_files(source_dir: str) -> list[str]:
  """Paths of the `.py` files under `source_dir`, relative and sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(source_dir):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    found += [os.path.relpath(os.path.join(dirpath, f), source_dir)
              for f in filenames if f.endswith(".py")]
  return sorted(found)


def _normalize(text: str) -> Optional[str]:
  text = " ".join(text.split())
  words = text.split(" ")
  if len(words) < MIN_WORDS or not any(c.isalpha() for c in text):
    return None
  return text


# Comments and string literals, left to right, so a "#" inside a string is
# never taken for a comment (a C-speed stand-in for the pure-Python tokenizer).
_COMMENT_OR_STRING = re.compile(
    r'#[^\n]*'
    r'|"""(?:\\.|[^\\])*?"""'
    r"|'''(?:\\.|[^\\])*?'''"
    r'|"(?:\\.|[^"\\\n])*"'
    r"|'(?:\\.|[^'\\\n])*'", re.DOTALL)


def _comment_blocks(source: str) -> list[tuple[int, str]]:
  """(first line, text) of each run of consecutive full-line comments."""
  blocks = []
  last_line, line, counted_to = -1, 1, 0
  for match in _COMMENT_OR_STRING.finditer(source):
    token = match.group()
    if not token.startswith("#") or token.startswith("#!") or "-*- coding" in token:
      continue
    line_start = source.rfind("\n", 0, match.start()) + 1
    if source[line_start:match.start()].strip():
      continue  # a trailing comment after code
    line += source.count("\n", counted_to, match.start())
    counted_to = match.start()
    text = token.lstrip("#").strip()
    if blocks and line == last_line + 1:
      blocks[-1] = (blocks[-1][0], blocks[-1][1] + " " + text)
    else:
      blocks.append((line, text))
    last_line = line
  return blocks


def _docstrings(body: list) -> list[tuple[int, str]]:
  """Docstrings of the classes and functions in `body`, at any statement depth."""
  found = []
  for statement in body:
    if isinstance(statement, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(statement, clean=True)
      if doc:
        found.append((statement.body[0].lineno, doc))
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
      inner = getattr(statement, field, None)
      if isinstance(inner, list):
        found += _docstrings(inner)
  return found


def extract_documents(relative_path: str, source: bytes) -> list[str]:
  """Docstrings and comment blocks of one file, in source order."""
  try:
    with warnings.catch_warnings():  # old escapes in test files; not our code
      warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
      tree = ast.parse(source)
    text = source.decode("utf-8")
  except (SyntaxError, ValueError, UnicodeDecodeError):
    return []  # a few test files are deliberately broken
  found = _docstrings(tree.body) + _comment_blocks(text)
  module_doc = ast.get_docstring(tree, clean=True)
  if module_doc:
    found.append((0, module_doc))
  if relative_path == _TOPICS_FILE:
    for statement in tree.body:
      if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Dict):
        found += [(v.lineno, v.value) for v in statement.value.values
                  if isinstance(v, ast.Constant) and isinstance(v.value, str)]
  found.sort(key=lambda item: item[0])
  return [doc for doc in (_normalize(t) for _, t in found) if doc]


def collect_documents(source_dir: str) -> list[str]:
  """All documents under `source_dir`, deduplicated, first occurrence first."""
  seen, documents = set(), []
  # Syntax trees hold no cycles, but their millions of nodes set off the cycle
  # collector, which then rescans everything TensorFlow keeps alive (3x slower).
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    for relative_path in python_files(source_dir):
      with open(os.path.join(source_dir, relative_path), "rb") as f:
        source = f.read()
      for doc in extract_documents(relative_path, source):
        if doc not in seen:
          seen.add(doc)
          documents.append(doc)
  finally:
    if gc_was_enabled:
      gc.enable()
  return documents


def _doc_hash(doc: str) -> int:
  return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big")


def split_documents(documents: list[str], num_train_shards: int = NUM_TRAIN_SHARDS
                    ) -> tuple[list[list[str]], list[str]]:
  """(train shards, validation), each in hash order, which shuffles topics."""
  train = [[] for _ in range(num_train_shards)]
  validation = []
  for doc in sorted(documents, key=_doc_hash):
    h = _doc_hash(doc)
    if h % 100 < VALIDATION_PERCENT:
      validation.append(doc)
    else:
      train[(h // 100) % num_train_shards].append(doc)
  return train, validation


def fingerprint(source_dir: str, vocab_size: int) -> str:
  """Changes with the Python version, the stdlib's files, or the settings."""
  digest = hashlib.sha256(json.dumps(
      [FORMAT_VERSION, vocab_size, NUM_TRAIN_SHARDS, sys.version.split()[0]]).encode())
  for relative_path in python_files(source_dir):
    size = os.path.getsize(os.path.join(source_dir, relative_path))
    digest.update(f"{relative_path}:{size}\n".encode())
  return digest.hexdigest()[:16]


def _write_lines(path: str, lines: list[str]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(line + "\n" for line in lines)


def _listing(directory: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  train = tuple(os.path.join(directory, f"train-{i:05d}-of-{NUM_TRAIN_SHARDS:05d}.txt")
                for i in range(NUM_TRAIN_SHARDS))
  return train, (os.path.join(directory, "validation.txt"),)


def _build(directory: str, source_dir: str, vocab_size: int) -> None:
  """Writes the corpus and its vocabulary into `directory` (which must not exist)."""
  from switch_jax.data import vocabularies  # TensorFlow, only when building

  start = time.time()
  documents = collect_documents(source_dir)
  train, validation = split_documents(documents)
  os.makedirs(directory)
  train_files, validation_files = _listing(directory)
  for path, shard in zip(train_files, train):
    _write_lines(path, shard)
  _write_lines(validation_files[0], validation)
  extract_seconds = time.time() - start
  vocab = vocabularies.train_sentencepiece(train_files, vocab_size, directory)
  tokenizer = vocab.tokenizer
  train_docs = [d for shard in train for d in shard]

  def tokens(docs):
    return sum(len(ids) for ids in tokenizer.encode(docs))

  stats = dict(
      python=sys.version.split()[0], source_dir=source_dir,
      documents=dict(train=len(train_docs), validation=len(validation)),
      characters=dict(train=sum(map(len, train_docs)),
                      validation=sum(map(len, validation))),
      words=dict(train=sum(len(d.split()) for d in train_docs),
                 validation=sum(len(d.split()) for d in validation)),
      tokens=dict(train=tokens(train_docs), validation=tokens(validation)),
      vocab_size=vocab.vocab_size, extract_seconds=round(extract_seconds, 1),
      total_seconds=round(time.time() - start, 1))
  with open(os.path.join(directory, "stats.json"), "w") as f:
    json.dump(stats, f, indent=2)


_BUILT: dict[tuple, EmbeddedCorpus] = {}


def corpus_directory(cache_dir: Optional[str] = None, source_dir: Optional[str] = None,
                     vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
  """Where the corpus for these settings lives (or will), without building it."""
  source_dir = source_dir or stdlib_dir()
  return os.path.join(storage.cache_root(cache_dir), "embedded_corpus",
                      fingerprint(source_dir, vocab_size))


def is_built(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "stats.json"))


@gin.configurable
def embedded_corpus(cache_dir: Optional[str] = None, source_dir: Optional[str] = None,
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> EmbeddedCorpus:
  """The corpus, built into the cache on the first call on this machine.

  Concurrent builders (several processes, or hosts sharing a disk) each
  write a private directory and rename it into place; the first rename wins.
  """
  cache_dir = storage.cache_root(cache_dir)
  source_dir = source_dir or stdlib_dir()
  key = (cache_dir, source_dir, vocab_size)
  if key not in _BUILT:
    directory = corpus_directory(cache_dir, source_dir, vocab_size)
    if not is_built(directory):
      os.makedirs(os.path.dirname(directory), exist_ok=True)
      staging = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(directory))
      try:
        _build(os.path.join(staging, "corpus"), source_dir, vocab_size)
        try:
          os.rename(os.path.join(staging, "corpus"), directory)
        except OSError:
          if not is_built(directory):
            raise
      finally:
        shutil.rmtree(staging, ignore_errors=True)
    with open(os.path.join(directory, "stats.json")) as f:
      stats = json.load(f)
    train, validation = _listing(directory)
    _BUILT[key] = EmbeddedCorpus(directory, train, validation,
                                 os.path.join(directory, "sentencepiece.model"), stats)
  return _BUILT[key]


def embedded_vocabulary_path() -> str:
  """The embedded corpus's vocabulary file (builds the corpus if needed)."""
  return embedded_corpus().vocabulary_file
