"""SentencePiece vocabularies: T5's defaults, loaded lazily, or trained here.

Tasks are registered at import time, before gin files are parsed, so a task
holds a `LazyVocabulary`: it asks a gin-configurable function for its file
on first use (and again if the binding changes), which lets one binding
(`c4_vocabulary_path.path = "/data/spm.model"`) repoint every C4 task, and
means registering tasks never reads a file or the network.

Either vocabulary convention works for a bound path: T5's `*.100extra`
files already hold the 100 sentinel pieces (extra_ids=0), a plain model gets
100 extra ids appended when loaded. Both give sentinel k at id
`vocab_size - 1 - k`. `train_sentencepiece` writes plain models with T5's
special ids (pad 0, eos 1, unk 2, no bos).

Model files, local or on a bucket (gs://...), are read and written through
`switch_jax.storage` (seqio's own loader reads with tf.io.gfile, whose GCS
client cannot be pointed at an emulator, so it would be the one path here
no test reaches).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from typing import Callable, Iterable, Sequence

import gin
import seqio
from sentencepiece import sentencepiece_model_pb2
import sentencepiece as spm

from switch_jax import storage
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


def _read_model(path: str) -> sentencepiece_model_pb2.ModelProto:
  """The model file at `path` (local or gs://), parsed.

  Raises:
    UserError: it is missing, unreachable or not a SentencePiece model.
  """
  try:
    data = storage.path(path).read_bytes()
    return sentencepiece_model_pb2.ModelProto.FromString(data)
  except Exception as e:  # missing, no network, no credentials, not a model  # pylint: disable=broad-except
    raise UserError(
        f"cannot read the SentencePiece vocabulary {path!r} ({e.__class__.__name__}). "
        "Offline, train one with `switch-jax vocab --input FILE --vocab_size N --out DIR` "
        "and bind its path (e.g. `c4_vocabulary_path.path = 'DIR/sentencepiece.model'`), "
        "or use the embedded tasks (`embedded_span_corruption`).") from None


@functools.lru_cache(maxsize=None)
def extra_ids_for(path: str) -> int:
  """0 if the model file already holds sentinel pieces, else `EXTRA_IDS`."""
  model = _read_model(path)
  has_sentinels = any(_EXTRA_ID_PIECE.match(p.piece) for p in model.pieces[-EXTRA_IDS:])
  return 0 if has_sentinels else EXTRA_IDS


@dataclasses.dataclass(frozen=True)
class _LoadedModel:
  """What seqio's SentencePieceVocabulary asks its model context for."""
  tokenizer: spm.SentencePieceProcessor
  sp_model: bytes  # the serialized model, sentinel pieces included


# SentencePieceProcessor.LoadFromSerializedProto is not thread-safe, and
# tf.data calls into vocabularies from several threads.
_load_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _load(path: str, extra_ids: int) -> _LoadedModel:
  """The model at `path` with `extra_ids` sentinel pieces appended, highest
  first (`<extra_id_0>` is the last id), as T5's span corruption numbers them."""
  model = _read_model(path)
  for k in reversed(range(extra_ids)):
    model.pieces.add(piece=f"\u2581<extra_id_{k}>", score=0.0,
                     type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
  serialized = model.SerializeToString()
  tokenizer = spm.SentencePieceProcessor()
  tokenizer.LoadFromSerializedProto(serialized)
  return _LoadedModel(tokenizer=tokenizer, sp_model=serialized)


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """seqio's SentencePiece vocabulary, its model file read through
  `switch_jax.storage` (local or gs://)."""

  def _model_context(self) -> _LoadedModel:
    if self._model is None:
      if self._normalizer_spec_overrides is not None or not self._reverse_extra_ids:
        raise ValueError("normalizer overrides and forward extra ids are not supported here")
      with _load_lock:
        self._model = _load(self._sentencepiece_model_file, self._extra_ids)
    return self._model


class LazyVocabulary(SentencePieceVocabulary):
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


def load_vocabulary(path: str) -> SentencePieceVocabulary:
  """A vocabulary from a model file of either convention (see module doc)."""
  return SentencePieceVocabulary(path, extra_ids=extra_ids_for(path))


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
    with storage.path(path).open("rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()


def train_sentencepiece(input_files: Sequence[str], vocab_size: int, out_dir: str, *,
                        text_key: str = "text", model_type: str = "unigram",
                        character_coverage: float = 0.9995,
                        max_sentences: int = 2_000_000, num_threads: int = 1
                        ) -> SentencePieceVocabulary:
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
  out = storage.path(out_dir)
  model_path, info_path = out / MODEL_FILE, out / INFO_FILE
  if info_path.exists():
    info = json.loads(info_path.read_text())
    if info.get("key") == key and model_path.exists():
      return SentencePieceVocabulary(str(model_path), extra_ids=EXTRA_IDS)
    raise UserError(f"{out_dir} already holds a vocabulary trained on other input or "
                    "settings; choose another --out directory or delete that one")
  if vocab_size < 8:
    raise UserError(f"vocab_size must be at least 8, got {vocab_size}")

  start = time.time()
  with tempfile.TemporaryDirectory(prefix="switch_jax-spm-") as work_dir:
    text_path = os.path.join(work_dir, "input.txt")
    num_lines = 0
    with open(text_path, "w", encoding="utf-8") as text:
      for path in files:
        for line in _training_lines(sources.read_documents(path, text_key)):
          text.write(line + "\n")
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
    with open(os.path.join(work_dir, "sentencepiece.vocab"), "rb") as f:
      pieces_text = f.read()
  # The trainer records its scratch paths; drop them so equal input gives
  # byte-equal models.
  del model.trainer_spec.input[:]
  model.trainer_spec.model_prefix = "sentencepiece"
  if not storage.is_bucket(out):  # a bucket's folders are only name prefixes
    out.mkdir(parents=True, exist_ok=True)
  model_path.write_bytes(model.SerializeToString())
  (out / "sentencepiece.vocab").write_bytes(pieces_text)
  # The info file is the cache's marker: written last, so a run cut short
  # leaves no vocabulary that looks finished.
  storage.write_atomically(info_path, json.dumps(
      dict(key=key, params=params, inputs=list(files), training_lines=num_lines,
           base_vocab_size=len(model.pieces), extra_ids=EXTRA_IDS,
           seconds=round(time.time() - start, 2)), indent=2))
  return SentencePieceVocabulary(str(model_path), extra_ids=EXTRA_IDS)
