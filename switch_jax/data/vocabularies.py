"""SentencePiece vocabularies: T5's defaults, loaded lazily, or trained here.

Tasks are registered at import time, before gin files are parsed, so a task
holds a `LazyVocabulary`: it asks a gin-configurable function for its file
on first use (and again if the binding changes), which lets one binding
(`c4_vocabulary_path.path = "/data/spm.model"`) repoint every C4 task, and
means registering tasks never reads a file or the network.

Either vocabulary convention works for a bound path: T5's `*.100extra`
files already hold the 100 sentinel pieces (extra_ids=0), a plain model gets
100 extra ids appended by seqio. Both give sentinel k at id
`vocab_size - 1 - k`. `train_sentencepiece` writes plain models with T5's
special ids (pad 0, eos 1, unk 2, no bos).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Callable, Iterable, Sequence

import gin
import seqio
import tensorflow as tf
from sentencepiece import sentencepiece_model_pb2
import sentencepiece as spm

from switch_jax.data import sources
from switch_jax.errors import UserError

C4_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
MC4_VOCAB_PATH = "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"
EXTRA_IDS = 100
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MODEL_FILE, INFO_FILE = "sentencepiece.model", "sentencepiece.json"
# SentencePiece skips longer training sentences; documents are cut to fit.
_MAX_TRAINING_LINE_CHARS = 4000
_EXTRA_ID_PIECE = re.compile(r"^\u2581?<extra_id_\d+>$")


@gin.configurable
def c4_vocabulary_path(path: str = C4_VOCAB_PATH) -> str:
  """The vocabulary of the C4, GLUE and SuperGLUE tasks (T5's, 32000 + 100)."""
  return path


@gin.configurable
def mc4_vocabulary_path(path: str = MC4_VOCAB_PATH) -> str:
  """The vocabulary of the mC4 tasks (mT5's, 250000 + 100)."""
  return path


@functools.lru_cache(maxsize=None)
def extra_ids_for(path: str) -> int:
  """0 if the model file already holds sentinel pieces, else `EXTRA_IDS`."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      model = sentencepiece_model_pb2.ModelProto.FromString(f.read())
  except (tf.errors.OpError, OSError) as e:  # missing file, no network, no credentials
    raise UserError(
        f"cannot read the SentencePiece vocabulary {path!r} ({e.__class__.__name__}). "
        "Offline, train one with `switch-jax vocab --input FILE --vocab_size N --out DIR` "
        "and bind its path (e.g. `c4_vocabulary_path.path = 'DIR/sentencepiece.model'`), "
        "or use the embedded tasks (`embedded_span_corruption`).") from e
  has_sentinels = any(_EXTRA_ID_PIECE.match(p.piece) for p in model.pieces[-EXTRA_IDS:])
  return 0 if has_sentinels else EXTRA_IDS


class LazyVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePiece vocabulary whose file comes from `path_fn()` at first use."""

  def __init__(self, path_fn: Callable[[], str], name: str):
    self._path_fn = path_fn
    self._name = name
    self._resolved_path = None
    super().__init__(sentencepiece_model_file="", extra_ids=0)

  def _resolve(self) -> None:
    path = self._path_fn()
    if path != self._resolved_path:
      extra_ids = extra_ids_for(path)  # may raise; leave the old state whole
      self._model = None
      self._sentencepiece_model_file = path
      self._extra_ids = extra_ids
      self._resolved_path = path

  def _model_context(self):
    self._resolve()
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    self._resolve()
    return self._sentencepiece_model_file

  @property
  def extra_ids(self) -> int:
    self._resolve()
    return self._extra_ids

  def __eq__(self, other):
    if isinstance(other, LazyVocabulary):
      return self._path_fn is other._path_fn
    return super().__eq__(other)

  def __str__(self) -> str:
    return f"LazyVocabulary({self._name}, path={self._resolved_path or 'not yet resolved'})"


def load_vocabulary(path: str) -> seqio.SentencePieceVocabulary:
  """A vocabulary from a model file of either convention (see module doc)."""
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids_for(path))


def text_output_features(vocabulary: seqio.Vocabulary) -> dict:
  """T5's features: inputs (optional, for LM-only tasks) and targets, both with EOS."""
  return {"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


def _training_lines(documents: Iterable[str]) -> Iterable[str]:
  """Documents cut at spaces into lines SentencePiece will not skip."""
  for doc in documents:
    doc = " ".join(doc.split())
    while len(doc) > _MAX_TRAINING_LINE_CHARS:
      cut = doc.rfind(" ", 0, _MAX_TRAINING_LINE_CHARS)
      cut = cut if cut > 0 else _MAX_TRAINING_LINE_CHARS
      yield doc[:cut]
      doc = doc[cut:].lstrip()
    if doc:
      yield doc


def _fingerprint(files: Sequence[str], params: dict) -> str:
  digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
  for path in files:
    with tf.io.gfile.GFile(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()


def train_sentencepiece(input_files: Sequence[str], vocab_size: int, out_dir: str, *,
                        text_key: str = "text", model_type: str = "unigram",
                        character_coverage: float = 0.9995,
                        max_sentences: int = 2_000_000, num_threads: int = 1
                        ) -> seqio.SentencePieceVocabulary:
  """Trains `out_dir/sentencepiece.model` once; later calls reuse it.

  Input files hold one document per line, plain text or JSON lines
  (`.jsonl`/`.json`, text under `text_key`), optionally gzipped. The result
  has pad 0, eos 1, unk 2, no bos, and `vocab_size` pieces (fewer if the
  text is too small), plus 100 extra ids added by the returned vocabulary.
  The cache key is a hash of the inputs' bytes and the parameters, kept in
  `out_dir/sentencepiece.json`; `out_dir` holding a vocabulary made from other
  input is an error rather than an overwrite, since checkpoints depend on it.
  `num_threads=1` keeps training deterministic.
  """
  files = sources.expand_file_patterns(input_files)
  params = dict(vocab_size=vocab_size, model_type=model_type, text_key=text_key,
                character_coverage=character_coverage, max_sentences=max_sentences,
                format=1)
  key = _fingerprint(files, params)
  model_path, info_path = os.path.join(out_dir, MODEL_FILE), os.path.join(out_dir, INFO_FILE)
  if tf.io.gfile.exists(info_path):
    with tf.io.gfile.GFile(info_path) as f:
      info = json.load(f)
    if info.get("key") == key and tf.io.gfile.exists(model_path):
      return seqio.SentencePieceVocabulary(model_path, extra_ids=EXTRA_IDS)
    raise UserError(f"{out_dir} already holds a vocabulary trained on other input or "
                    "settings; choose another --out directory or delete that one")
  if vocab_size < 8:
    raise UserError(f"vocab_size must be at least 8, got {vocab_size}")

  start = time.time()
  tf.io.gfile.makedirs(out_dir)
  work_dir = tempfile.mkdtemp(prefix=".spm-", dir=out_dir)
  try:
    text_path = os.path.join(work_dir, "input.txt")
    num_lines = 0
    with open(text_path, "w", encoding="utf-8") as out:
      for path in files:
        for line in _training_lines(sources.read_documents(path, text_key)):
          out.write(line + "\n")
          num_lines += 1
    if num_lines == 0:
      raise UserError(f"no text in {', '.join(files)}: every line is empty")
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        input=text_path, model_prefix=os.path.join(work_dir, "sentencepiece"),
        vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, pad_id=PAD_ID, eos_id=EOS_ID,
        unk_id=UNK_ID, bos_id=-1, hard_vocab_limit=False,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentence_length=4 * _MAX_TRAINING_LINE_CHARS, num_threads=num_threads,
        minloglevel=2)
    with open(os.path.join(work_dir, "sentencepiece.model"), "rb") as f:
      model = sentencepiece_model_pb2.ModelProto.FromString(f.read())
    # The trainer records its scratch paths; drop them so equal input gives
    # byte-equal models.
    del model.trainer_spec.input[:]
    model.trainer_spec.model_prefix = "sentencepiece"
    with open(model_path, "wb") as f:
      f.write(model.SerializeToString())
    shutil.move(os.path.join(work_dir, "sentencepiece.vocab"),
                os.path.join(out_dir, "sentencepiece.vocab"))
    base_size = len(model.pieces)
    with open(info_path, "w") as f:
      json.dump(dict(key=key, params=params, inputs=list(files), training_lines=num_lines,
                     base_vocab_size=base_size, extra_ids=EXTRA_IDS,
                     seconds=round(time.time() - start, 2)), f, indent=2)
  finally:
    shutil.rmtree(work_dir, ignore_errors=True)
  return seqio.SentencePieceVocabulary(model_path, extra_ids=EXTRA_IDS)
