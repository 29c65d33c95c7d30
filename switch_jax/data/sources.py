"""Where task data comes from: read-only TFDS, and text files named at run time.

TFDS sources never download or generate (`read_only=True`); their directory
is `--tfds_data_dir` / `tfds_data_dir.path` / `$TFDS_DATA_DIR` /
`~/tensorflow_datasets`, and a missing dataset is a `UserError` that names the
dataset, the directory looked in, and how to prepare it.

`TextFilesSource` reads documents, one per line, from plain-text or
JSON-lines files (optionally gzipped) whose names are only known when the
data is first read (a gin binding, or a corpus built on first use). It
checks the files once before reading: they exist, they are not empty, and
they look like UTF-8 text.

Text files, local or on a bucket (gs://...), are found and checked through
`switch_jax.storage`, the file layer the rest of the package writes with:
TensorFlow's GCS client cannot be pointed at an emulator, so only this layer
is tested on gs://. They are read by tf.data's own `TextLineDataset`, so
that a reading position can be saved with a checkpoint (a Python generator's
cannot); a bucket file is first copied whole into the local cache
(`<cache>/bucket_files/`, see `storage.cache_root`) by the file layer, when
the stream reaches it, and read from there. TFDS data directories stay on
tf.data (`--tfds_data_dir gs://...` is read by TensorFlow's own GCS client).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator, Optional, Sequence, Union

import gin
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from switch_jax import storage
from switch_jax.errors import UserError

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# Bytes read per file to decide whether it is UTF-8 text.
_SNIFF_BYTES = 1 << 16
# JSON lines handed from tf.data to Python's parser at a time: one call per
# line would cost more than parsing the line.
_LINES_PER_BLOCK = 256


@gin.configurable
def tfds_data_dir(path: Optional[str] = None) -> Optional[str]:
  """The TFDS data directory bound in gin (`tfds_data_dir.path = ...`)."""
  return path


def explicit_tfds_data_dir(flag: Optional[str] = None) -> Optional[str]:
  """The flag, else the gin binding; None leaves each source's own setting."""
  return flag or tfds_data_dir()


def tfds_source(tfds_name: str, splits=None) -> seqio.TfdsDataSource:
  """A TFDS source that reads prepared data and never downloads."""
  return seqio.TfdsDataSource(tfds_name=tfds_name, splits=splits, read_only=True)


def tfds_sources(tasks: Sequence[seqio.Task]) -> list[tuple[str, seqio.TfdsDataSource]]:
  return [(t.name, t.source) for t in tasks if isinstance(t.source, seqio.TfdsDataSource)]


def use_tfds_data_dir(tasks: Sequence[seqio.Task], data_dir: Optional[str]) -> None:
  """Points the tasks' TFDS sources at `data_dir` (no change if None)."""
  if data_dir:
    for _, source in tfds_sources(tasks):
      source.tfds_dataset.override_data_dir(data_dir)


def source_data_dir(source: seqio.TfdsDataSource) -> str:
  """Where a source reads: its override or own directory, $TFDS_DATA_DIR, or the default."""
  return source.tfds_dataset.data_dir or tfds.core.constants.DATA_DIR


def _prepare_hint(tfds_name: str, data_dir: str) -> str:
  if tfds_name.startswith("c4/"):
    return (f"C4/mC4 are built from Common Crawl with Apache Beam (terabytes in, hundreds "
            f"of GB out), so copy an already prepared copy into {data_dir} or point "
            f"--tfds_data_dir at one (a gs:// path works); or train on the C4 JSON files with "
            f"the local_span_corruption task (docs/data.md)")
  return (f"on a machine with internet access run `tfds build {tfds_name} --data_dir DIR` "
          f"and copy DIR's contents into {data_dir}")


def missing_tfds_data(tasks: Sequence[seqio.Task]) -> list[tuple[str, str, str, str]]:
  """(task, tfds_name, data_dir, expected path) of each source that is not prepared."""
  missing = []
  for task_name, source in tfds_sources(tasks):
    name, data_dir = source.tfds_dataset.name, source_data_dir(source)
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      prepared, path = builder.is_prepared(), str(builder.data_path)
    except Exception:  # pylint: disable=broad-except
      # TFDS code that cannot build this version (c4 3.0.1) only loads from files.
      prepared = False
      path = os.path.join(data_dir, *name.replace(":", "/").split("/"))
    if not prepared:
      missing.append((task_name, name, data_dir, path))
  return missing


def missing_tfds_error(missing: Sequence[tuple[str, str, str, str]]) -> UserError:
  task_name, name, data_dir, path = missing[0]
  more = f" (and {len(missing) - 1} more datasets)" if len(missing) > 1 else ""
  return UserError(
      f"TFDS dataset {name} (task {task_name}){more} is not prepared: nothing at {path}. "
      f"Tasks never download; {_prepare_hint(name, data_dir)}, and pass --tfds_data_dir "
      f"(gin: tfds_data_dir.path). With no data at all, use `embedded_span_corruption`.")


# Text files.

def _matching_files(pattern: str) -> list[str]:
  """The files (not directories) that `pattern` names, local or gs://.

  The glob runs from the pattern's last folder without wildcards, so a
  bucket is listed under that prefix only.
  """
  if not glob.has_magic(pattern):
    return [str(storage.path(pattern))] if storage.is_there(pattern, "text file", "file") else []
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
  base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
  if "**" in pattern:
    raise UserError(f"{pattern}: recursive ** patterns are not supported (a bucket would be "
                    "listed folder by folder); use * in each folder")
  try:
    found = [p for p in storage.path(base).glob("/".join(parts[first:])) if p.is_file()]
  except ImportError as e:  # fsspec without gcsfs
    raise UserError(f"{pattern}: reading gs:// paths needs gcsfs (pip install gcsfs): "
                    f"{e}") from None
  except Exception as e:  # credentials, permissions, an unreachable endpoint
    raise UserError(f"cannot list {pattern} ({storage.describe_error(e)})") from None
  return [str(p) for p in found]


def expand_file_patterns(patterns: Sequence[str] | str) -> list[str]:
  """Sorted, de-duplicated files matching the patterns (local paths made
  absolute); a `UserError` if none."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  files = sorted({f for p in patterns for f in _matching_files(str(p))})
  if not files:
    raise UserError(f"no files match {patterns}; check the path or glob")
  return files


@contextlib.contextmanager
def _open(path: str) -> Iterator:
  """`path`'s bytes through the file layer, un-gzipped if it ends in .gz."""
  try:
    raw = storage.path(path).open("rb")
  except FileNotFoundError:
    raise UserError(f"text file {path} does not exist") from None
  with raw:
    if not path.endswith(".gz"):
      yield raw
      return
    with gzip.GzipFile(fileobj=raw) as unzipped:
      yield unzipped


def is_json_lines(path: str) -> bool:
  return path.endswith(_JSON_SUFFIXES)


def read_documents(path: str, text_key: str = "text") -> Iterator[str]:
  """Each non-empty document of one file, decoded leniently (bad bytes -> U+FFFD)."""
  with _open(path) as f:
    for line_number, line in enumerate(f, 1):
      text = line.decode("utf-8", "replace").strip()
      if text and is_json_lines(path):
        try:
          text = str(json.loads(text)[text_key]).strip()
        except (ValueError, KeyError, TypeError):
          logging.warning("%s:%d is not a JSON object with key %r; skipped",
                          path, line_number, text_key)
          continue
      if text:
        yield text


def _sample_has_text(sample: bytes, path: str, text_key: str) -> bool:
  for line in sample.split(b"\n"):
    text = line.decode("utf-8", "replace").strip()
    if text and is_json_lines(path):
      try:
        text = str(json.loads(text).get(text_key, "")).strip()
      except (ValueError, AttributeError):
        text = ""  # a bad line, or one cut at the sample's end
    if text:
      return True
  return False


def check_text_file(path: str, text_key: str = "text") -> bool:
  """True if `path` starts with text; `UserError` if it is not UTF-8 (or JSON lines)."""
  with _open(path) as f:
    try:
      sample = f.read(_SNIFF_BYTES)
    except gzip.BadGzipFile:
      raise UserError(f"{path} ends in .gz but is not gzip data; rename it or "
                      "compress it") from None
  if b"\x00" in sample:
    raise UserError(f"{path} contains NUL bytes: it is binary or UTF-16, not UTF-8 text. "
                    f"Convert it, e.g. `iconv -f UTF-16 -t UTF-8 {path} > out.txt`")
  decoded = sample.decode("utf-8", "replace")
  # A multi-byte character cut at the sample's end is not an error.
  bad = decoded[:-1].count("\ufffd")
  if bad > max(8, len(decoded) // 100):
    raise UserError(f"{path} is not UTF-8 ({bad} undecodable bytes in the first "
                    f"{len(sample)}). Convert it, e.g. `iconv -f LATIN1 -t UTF-8 {path} > out.txt`")
  if is_json_lines(path) and sample.strip():
    first_line = sample.split(b"\n", 1)[0].decode("utf-8", "replace")
    try:
      ok = text_key in json.loads(first_line)
    except (ValueError, TypeError):
      ok = False
    if not ok:
      raise UserError(f"{path}: the first line is not a JSON object with key {text_key!r}; "
                      "rename the file to .txt for plain text, or set the text key")
  return _sample_has_text(sample, path, text_key)


@functools.lru_cache(maxsize=64)
def checked_text_files(patterns: tuple[str, ...], text_key: str = "text") -> tuple[str, ...]:
  """The files matching `patterns`, after `check_text_file`; `UserError` if all are empty."""
  files = expand_file_patterns(patterns)
  if not any([check_text_file(f, text_key) for f in files]):
    raise UserError(f"the corpus {list(patterns)} is empty: no file has a non-empty "
                    "document in its first 64 KiB")
  return tuple(files)


class TextFilesSource(seqio.FileDataSource):
  """Documents, one per line, from files that `files_fn(split)` names when first read.

  Yields `{"text": string}`. JSON-lines files give their `text_key` field (a
  string, or a function returning it when the data is read); a
  line that is not valid JSON becomes an empty document, which the
  preprocessors drop, so one bad line does not end the stream. Files are
  read through `switch_jax.storage` (see the module docstring), so a
  bucket's files are read as a local file's are.
  """

  def __init__(self, files_fn: Callable[[str], Sequence[str]],
               splits: Sequence[str] = ("train", "validation"),
               text_key: Union[str, Callable[[], str]] = "text"):
    self._files_fn = files_fn
    self._text_key_fn = text_key if callable(text_key) else (lambda: text_key)
    self._text_key = None
    super().__init__(read_file_fn=self._read_file,
                     split_to_filepattern={split: None for split in splits})

  def list_shards(self, split: str) -> Sequence[str]:
    return list(self._files_fn(split))

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
    self._text_key = self._text_key_fn()
    return super().get_dataset(split=split, shuffle=shuffle, seed=seed,
                               shard_info=shard_info, **kwargs)

  def _read_file(self, filename: tf.Tensor) -> tf.data.Dataset:
    """`{"text": <string>[]}` per line of one file (`filename`: <string>[])."""
    parse = functools.partial(_json_texts, text_key=self._text_key)
    is_json = tf.strings.regex_full_match(filename, _JSON_PATTERN)

    def documents(block):  # <string>[<= _LINES_PER_BLOCK] lines -> documents
      return tf.cond(is_json, lambda: tf.ensure_shape(tf.numpy_function(
          parse, [block], tf.string, stateful=False), block.shape), lambda: block)

    local = tf.cond(tf.strings.regex_full_match(filename, "gs://.*"),
                    lambda: tf.numpy_function(_cached_copy, [filename], tf.string,
                                              stateful=False),
                    lambda: filename)
    lines = tf.data.TextLineDataset(local, compression_type=tf.where(
        tf.strings.regex_full_match(filename, r".*\.gz"), "GZIP", ""))
    return lines.batch(_LINES_PER_BLOCK).map(documents).unbatch().map(
        lambda text: {"text": text})


_JSON_PATTERN = "|".join(".*" + suffix.replace(".", r"\.") for suffix in _JSON_SUFFIXES)


def _json_texts(lines: np.ndarray, text_key: str) -> np.ndarray:
  """Each JSON line's `text_key` field, b"" for a line that has none.

  A pure function of its input (tf.data is told it is stateless, so that a
  reading position can be saved: it must stay so).
  """
  texts = []
  for line in lines:
    try:
      texts.append(str(json.loads(line.decode("utf-8", "replace"))[text_key]).encode("utf-8"))
    except (ValueError, KeyError, TypeError):
      texts.append(b"")
  return np.array(texts, dtype=object)


def bucket_cache_path(path: str) -> str:
  """Where `path` (gs://...) is kept locally once the stream reaches it.

  Named by the object's path, size and modification time, so a changed
  object is copied again.
  """
  info = storage.path(path).stat()
  key = hashlib.sha256(f"{path}\0{info.length}\0{info.mtime}".encode()).hexdigest()[:24]
  return os.path.join(storage.cache_root(), "bucket_files", key, os.path.basename(path))


def _cached_copy(filename: bytes) -> bytes:
  """The local copy of a bucket file, made now if missing.

  Its result depends on the file's name (and unchanged contents) only, which
  is why tf.data may treat it as stateless: copying again after a restore
  gives the same file.
  """
  path = filename.decode("utf-8")
  local = bucket_cache_path(path)
  if not os.path.exists(local):
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(local), delete=False) as out:
      with storage.path(path).open("rb") as source:
        shutil.copyfileobj(source, out, 1 << 24)
    os.replace(out.name, local)
  return local.encode("utf-8")
