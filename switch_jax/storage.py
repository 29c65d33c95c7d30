"""One file layer for local paths and Cloud Storage buckets (gs://...).

Every path a user gives (a MODEL_DIR, a checkpoint, an examples or output
file, a Hugging Face directory) goes through `path`, an `etils.epath.Path`.
For gs:// epath picks TensorFlow's GCS filesystem when TensorFlow is
importable, else fsspec's gcsfs. We choose gcsfs for every gs:// path
(EPATH_USE_TF=false unless the user set it): it is the one that honours
STORAGE_EMULATOR_HOST, so the same code that writes a real bucket is the
code the tests run against a local emulator. Orbax writes its array data
through tensorstore, which reads TENSORSTORE_GCS_HTTP_URL for the same.

A bucket has no rename and no append: `write_atomically` relies on an object
appearing whole when its upload finishes, and `staged_directory` builds a
directory on local disk and uploads it with its marker file last.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Iterator, Optional, Sequence

import gin
from etils import epath
from etils.epath import gpath

from switch_jax.errors import UserError

BUCKET_PREFIX = "gs://"


@gin.configurable
def cache_root(path: Optional[str] = None) -> str:
  """switch-jax's local cache: `path`, else $SWITCH_JAX_CACHE, else
  ~/.cache/switch_jax (gin: `cache_root.path`)."""
  return path or os.environ.get("SWITCH_JAX_CACHE") or os.path.expanduser(
      "~/.cache/switch_jax")


def _use_gcsfs() -> None:
  """gs:// through fsspec/gcsfs, not tf.io.gfile (see the module docstring)."""
  os.environ.setdefault("EPATH_USE_TF", "false")
  # epath caches its TensorFlow check; one made before this import would win.
  cached = getattr(gpath, "_is_tf_installed", None)
  if hasattr(cached, "cache_clear"):
    cached.cache_clear()


_use_gcsfs()


def is_bucket(path) -> bool:
  """True for a Cloud Storage path (gs://BUCKET/...)."""
  return str(path).startswith(BUCKET_PREFIX)


def path(value) -> epath.Path:
  """`value` as an epath.Path: a local path made absolute, a bucket's as it is."""
  if not value:
    raise UserError("an empty path was given")
  result = epath.Path(value)
  return result if is_bucket(value) else result.absolute()


def describe_error(error: Exception) -> str:
  """`Type: first line` of an error from a file layer, for a one-line message;
  a long line keeps its start and its end (where tensorstore puts the cause:
  "... No space left on device [os_error_code='28']")."""
  first = str(error).splitlines()[0] if str(error) else ""
  if len(first) > 240:
    first = f"{first[:100]} ... {first[-130:]}"
  return f"{type(error).__name__}: {first}"


def is_there(value, what: str, kind: str = "any") -> bool:
  """Whether `path(value)` exists (as a "file", a "dir" or "any").

  Raises:
    UserError: the bucket cannot be reached (no gcsfs, no credentials, no
      permission, no endpoint); the message names the path and what it is.
  """
  result = path(value)
  try:
    return {"file": result.is_file, "dir": result.is_dir, "any": result.exists}[kind]()
  except ImportError as e:  # fsspec without gcsfs
    raise UserError(f"{what} {value}: reading gs:// paths needs gcsfs (pip install gcsfs): "
                    f"{e}") from None
  except Exception as e:  # credentials, permissions, an unreachable endpoint
    raise UserError(f"{what} {value}: cannot read it ({describe_error(e)})") from None


def check(value, what: str, *, kind: str = "any") -> epath.Path:
  """`path(value)`, checked to exist (as a "file", a "dir" or "any").

  Raises:
    UserError: it is missing or cannot be reached; the message names it.
  """
  if not is_there(value, what, kind):
    expected = {"file": "file", "dir": "directory", "any": "file or directory"}[kind]
    raise UserError(f"{what} {value} does not exist (expected a {expected})")
  return path(value)


def parent_exists(value) -> bool:
  """Whether an output file at `value` can be written: its directory exists
  (always, on a bucket, where directories are only name prefixes)."""
  return is_bucket(value) or path(value).parent.is_dir()


def write_atomically(file, text: str) -> None:
  """Readers see the old file or the whole new one, never a partial file: a
  local file is written beside and renamed; an object on a bucket appears
  only once its upload completes."""
  file = path(file)
  if is_bucket(file):
    file.write_text(text, encoding="utf-8")
    return
  file.parent.mkdir(parents=True, exist_ok=True)
  tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  tmp.replace(file)


def files(directory) -> list[epath.Path]:
  """Every file under `directory`, sorted (buckets refuse rglob: one listing
  per folder here)."""
  found, pending = [], [path(directory)]
  while pending:
    for entry in pending.pop().iterdir():
      if entry.is_dir():
        pending.append(entry)
      else:
        found.append(entry)
  return sorted(found)


def upload_tree(local_dir, destination, last: Sequence[str] = ()) -> None:
  """Copies the files under `local_dir` to `destination`, the files named in
  `last` (relative paths) after all others, so a reader that waits for them
  sees the rest complete."""
  local_dir, destination = pathlib.Path(local_dir), path(destination)
  files = sorted(p for p in local_dir.rglob("*") if p.is_file())
  order = [p for p in files if str(p.relative_to(local_dir)) not in last]
  order += [local_dir / name for name in last if (local_dir / name).is_file()]
  for file in order:
    target = destination / str(file.relative_to(local_dir))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "rb") as src, target.open("wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)


@contextlib.contextmanager
def local_copy(directory, names: Sequence[str] | None = None) -> Iterator[epath.Path]:
  """Yields a local directory holding `directory`'s files (those in `names`
  only, if given): the directory itself when local, else a temporary
  download removed afterwards. For readers that need real files
  (safetensors memory-maps, torch.load)."""
  source = check(directory, "directory", kind="dir")
  if not is_bucket(source):
    yield source
    return
  with tempfile.TemporaryDirectory(prefix="switch_jax-download-") as tmp:
    local = epath.Path(tmp)
    wanted = ([source / n for n in names if (source / n).is_file()] if names is not None
              else files(source))
    for file in wanted:
      target = local / str(file.relative_to(source))
      target.parent.mkdir(parents=True, exist_ok=True)
      with file.open("rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    yield local


@contextlib.contextmanager
def staged_directory(destination, marker: str, overwrite: bool = False
                     ) -> Iterator[epath.Path]:
  """Yields an empty local directory whose files become `destination`'s.

  Locally: a temporary sibling renamed into place on success (a reader never
  sees half a directory). On a bucket, which cannot rename: a local
  temporary uploaded on success with `marker` last, so a reader that looks
  for `marker` never takes a half-uploaded directory for a whole one.
  If the block raises, nothing is written at `destination`.

  Raises:
    UserError: `destination` is a file, or a non-empty directory and not
      `overwrite`.
  """
  destination = path(destination)
  if destination.exists() and not destination.is_dir():
    raise UserError(f"{destination} exists and is not a directory")
  if destination.is_dir() and any(destination.iterdir()) and not overwrite:
    raise UserError(f"{destination} exists and is not empty; choose a new path or pass "
                    "--overwrite")
  if is_bucket(destination):
    with tempfile.TemporaryDirectory(prefix="switch_jax-upload-") as tmp:
      yield epath.Path(tmp)
      if destination.is_dir():  # overwrite: the old objects go first
        destination.rmtree()
      upload_tree(tmp, destination, last=(marker,))
    return
  destination.parent.mkdir(parents=True, exist_ok=True)
  # mkdir (not mkdtemp) so the directory gets the umask's permissions, not 0700.
  tmp = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:12]}"
  tmp.mkdir()
  try:
    yield tmp
    if destination.exists():
      old = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:12]}"
      destination.rename(old)
      try:
        tmp.rename(destination)
      except BaseException:
        old.rename(destination)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      tmp.rename(destination)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
