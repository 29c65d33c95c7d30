"""Checkpoint steps that prove they are intact: a manifest of content hashes.

Orbax stores no checksums: a step whose bytes were damaged but whose arrays
still decode restores silently, and damage in a file the restore happens not
to read (another process's OCDBT data file) goes unnoticed until it is read.
So every training step carries `manifest.sha256.json`:

  {"format": "switch_jax.manifest/1", "hash": "sha256",
   "files": {"params/d/<name>": {"size": <int>, "sha256": "<hex>"}, ...}}

covering every file of the step (all items: params/, opt_state/, meta/ and
any other, and orbax's _CHECKPOINT_METADATA), relative to the step directory.

It is written by the step's temporary path at its commit
(`ManifestRenamePath`, `ManifestCommitFilePath`, subclasses of orbax's), so
it is part of what becomes visible at once: locally, inside the temporary
directory before the rename; on a bucket (no rename), before
commit_success.txt, without which orbax takes a step for unfinished. On
several hosts orbax runs the step's finalize on the primary host only, after
every host wrote its shards, so the one manifest covers all of them.

sha256: hashlib's, about 1.8 GB/s a core here (SHA extensions); blake2b
measured 1.25 GB/s and crc32 6.3 GB/s (bench/bench_checkpoint_integrity.py).
Files are hashed on a few threads (hashlib releases the GIL).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import time
from typing import Optional, Sequence

from etils import epath
from orbax.checkpoint._src.metadata import checkpoint as checkpoint_metadata
from orbax.checkpoint._src.path import atomicity

from switch_jax import storage
from switch_jax.errors import UserError

MANIFEST = "manifest.sha256.json"
FORMAT = "switch_jax.manifest/1"
HASH = "sha256"
# Written after the manifest, by orbax's commit: not in it.
_UNCOVERED = (MANIFEST, atomicity.COMMIT_SUCCESS_FILE)
_CHUNK = 1 << 24
_THREADS = 4


def _digest(file: epath.Path) -> tuple[int, str]:
  """(size in bytes, sha256 hex) of one file, read in 16 MiB chunks."""
  digest, size = hashlib.sha256(), 0
  with file.open("rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
      size += len(chunk)
  return size, digest.hexdigest()


def _covered(directory: epath.Path) -> list[str]:
  """The relative paths of the files a manifest covers."""
  names = [str(f.relative_to(directory)) for f in storage.files(directory)]
  return [n for n in names if n not in _UNCOVERED]


def _digests(directory: epath.Path, names: list[str]) -> dict[str, tuple[int, str]]:
  with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
    return dict(zip(names, pool.map(lambda n: _digest(directory / n), names)))


def write_manifest(directory) -> dict:
  """Hashes every file under `directory` and writes its manifest there;
  returns the manifest."""
  directory = storage.path(directory)
  digests = _digests(directory, _covered(directory))
  manifest = {"format": FORMAT, "hash": HASH, "files": {
      name: {"size": size, HASH: hexdigest} for name, (size, hexdigest) in sorted(digests.items())}}
  (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
  return manifest


def has_manifest(directory) -> bool:
  return (storage.path(directory) / MANIFEST).is_file()


def verify(directory, items: Optional[Sequence[str]] = None) -> Optional[str]:
  """Checks `directory` against its manifest (only the files under the
  folders named in `items`, if given).

  Returns:
    None when every file the manifest names is there with its size and
    hash; else one line naming the first file that is missing, of another
    size or another content (or the manifest itself, when unreadable).
    Files the manifest does not name are not checked.

  Raises:
    FileNotFoundError: `directory` has no manifest (see `has_manifest`).
  """
  directory = storage.path(directory)
  data = (directory / MANIFEST).read_bytes()
  try:
    manifest = json.loads(data.decode("utf-8"))
    files = manifest["files"]
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
      raise ValueError(f"format {manifest.get('format')!r}")
    for entry in files.values():
      int(entry["size"]), str(entry[HASH])  # pylint: disable=expression-not-assigned
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    return f"{MANIFEST} is unreadable ({type(e).__name__}: {str(e)[:100]})"
  if items is not None:
    files = {n: e for n, e in files.items() if n.split("/", 1)[0] in items}
  present = set(_covered(directory))
  for name in sorted(files):
    if name not in present:
      return f"{name} is missing"
  for name in sorted(files):
    size = (directory / name).stat().length
    if size != files[name]["size"]:
      return f"{name} has {size} bytes, the manifest says {files[name]['size']}"
  digests = _digests(directory, sorted(files))
  for name in sorted(files):
    if digests[name][1] != files[name][HASH]:
      return f"{name} does not match its {HASH} in the manifest"
  return None


def check_items(step_dir, items: Sequence[str]) -> None:
  """For readers of one step that have no earlier step to fall back to
  (eval, export, fine-tuning from a run): the files of `items` checked
  against the step's manifest; a step without one passes unverified.

  Raises:
    UserError: a file is damaged or missing; the message names it.
  """
  step_dir = storage.path(step_dir)
  if not has_manifest(step_dir):
    return
  try:
    problem = verify(step_dir, items)
  except OSError as e:
    problem = f"cannot be read ({storage.describe_error(e)})"
  if problem is not None:
    raise UserError(f"checkpoint {step_dir} fails its manifest: {problem}; choose another step "
                    "(a training run sets such a step aside and resumes from the one before)")


def _is_step(path: epath.Path) -> bool:
  """A step directory (`checkpoints/<step>`), not one of its items."""
  return path.name.isdigit()


class _Manifested:
  """Writes the manifest into a step at its commit, after orbax's own
  step metadata update (made here first, so the manifest covers the final
  _CHECKPOINT_METADATA and the commit does not change it afterwards)."""

  async def finalize(self):  # pylint: disable=missing-function-docstring
    if _is_step(self.get_final()):
      store = getattr(self, "_checkpoint_metadata_store", None)
      if store is not None:
        await asyncio.to_thread(store.wait_until_finished)
        await asyncio.to_thread(
            store.update, file_path=checkpoint_metadata.step_metadata_file_path(self.get()),
            commit_timestamp_nsecs=time.time_ns())
        await asyncio.to_thread(store.wait_until_finished)
        self._checkpoint_metadata_store = None  # done: the commit must not write it again
      await asyncio.to_thread(write_manifest, self.get())
    await super().finalize()


class ManifestRenamePath(_Manifested, atomicity.AtomicRenameTemporaryPath):
  """Local steps: the manifest goes in before the temporary directory's rename."""


class ManifestCommitFilePath(_Manifested, atomicity.CommitFileTemporaryPath):
  """Bucket steps: the manifest goes up before commit_success.txt."""


def temporary_path_class(directory) -> type:
  """The temporary path class for steps under `directory` (local or gs://)."""
  return ManifestCommitFilePath if storage.is_bucket(directory) else ManifestRenamePath
