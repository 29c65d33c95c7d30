"""A host's training batches whose place in the stream is saved and restored.

    batches = HostBatches(make_dataset(), identity)  # fresh: from batch 0
    batch = next(batches)                          # {feature: <int32>[B, L]}
    saved = batches.state()                        # bytes, with each checkpoint
    ...
    batches = resume(make_dataset, identity, start_batch=n, saved=saved, warn=print)

Resuming by rebuilding the stream and skipping the `n` batches before the
checkpoint reads, tokenizes, packs and corrupts every one of them again, at
a cost that grows with the step (step 100k at batch 256: 25.6M examples).
`HostBatches` saves tf.data's own iterator state instead
(`tf.train.Checkpoint(iterator=...)`): the offset in each open file, the
shuffle, packing and prefetch buffers and the streams of random seeds. A
restored iterator yields exactly the batch that came next, so the resumed
run stays bit-identical to the uninterrupted one, at a cost that does not
depend on the step. The state is taken synchronously, between two `next`
calls, so it holds exactly the batches handed out so far; batches that
tf.data had prefetched but not handed out are inside the state.

Where the saved state cannot be used, `resume` replays: it builds the
stream afresh and reads `n` batches past, which is bit-identical too, but
costs what it always did, and says why:
- the checkpoint has no state (made before this existed, or by a pipeline
  that cannot save one: a `tf.data.Dataset.from_generator` or stateful
  `py_function` source, e.g. TFDS mock data);
- the host count changed. Each host reads its own shard (whole files, else
  every k-th example, see `pipeline`), so a run on a different number of
  hosts reads different streams: no saved state fits them, and the
  replayed stream is that of the new host count, not the one the
  uninterrupted run would have read. Bit-identity with the uninterrupted run
  holds only for the same host count;
- the data settings or the pipeline's code changed (the state is
  rejected).

The bytes are a zip (stored, not compressed) of `position.json` (batches
handed out, and the stream's identity) and the tf.data checkpoint's files.
"""

from __future__ import annotations

import io
import json
import re
import uuid
import zipfile
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
import tensorflow as tf

_POSITION = "position.json"
_PREFIX = "iterator"


class PositionNotSaved(Exception):
  """This pipeline's position cannot be saved (the reason is the message)."""


class PositionMismatch(Exception):
  """A saved state that does not belong to this stream (the reason is the message)."""


class HostBatches(Iterator[dict]):
  """Numpy batches of `dataset`, counting how many were handed out.

  Args:
    dataset: the host's batched stream.
    identity: JSON-able description of the stream (dataset settings, shard);
      a saved state is restored only into a stream with the same identity.
  """

  def __init__(self, dataset: tf.data.Dataset, identity: Mapping[str, Any]):
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    self.identity = json.loads(json.dumps(identity))
    self.position = 0  # batches handed out, including those before a restore
    self._not_saved = False

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.position += 1
    return {name: value.numpy() for name, value in batch.items()}

  def skip(self, batches: int) -> None:
    """Reads `batches` batches past (the replay); they cost what reading them does."""
    for _ in range(batches):
      next(self._iterator)
    self.position += batches

  def state(self) -> bytes:
    """The position as bytes: what restores to the next batch, exactly.

    Raises:
      PositionNotSaved: the pipeline holds state that tf.data cannot save.
    """
    scratch = f"ram://switch_jax_iterator/{uuid.uuid4().hex}"
    try:
      try:
        self._checkpoint.write(f"{scratch}/{_PREFIX}")
      except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError) as e:
        raise PositionNotSaved(_first_line(e)) from None
      buffer = io.BytesIO()
      with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(_POSITION, json.dumps(
            {"batches": self.position, "identity": self.identity}, sort_keys=True))
        for path in sorted(tf.io.gfile.glob(f"{scratch}/*")):
          with tf.io.gfile.GFile(path, "rb") as f:
            archive.writestr(path.rsplit("/", 1)[1], f.read())
      return buffer.getvalue()
    finally:
      for path in tf.io.gfile.glob(f"{scratch}/*"):
        tf.io.gfile.remove(path)

  def state_or_none(self, warn: Callable[[str], None]) -> Optional[bytes]:
    """`state()`, or None for a pipeline whose position cannot be saved
    (said once through `warn`, and not tried again)."""
    if self._not_saved:
      return None
    try:
      return self.state()
    except PositionNotSaved as e:
      self._not_saved = True
      warn(f"the training data pipeline cannot save its position ({e}); checkpoints record "
           "the number of batches read, and a resume replays that many")
      return None

  def restore(self, state: bytes, batches: int) -> None:
    """Moves a fresh iterator to the position in `state`, which must be `batches`.

    Raises:
      PositionMismatch: `state` is for another stream or position, or does
        not fit this pipeline (its code changed).
    """
    scratch = f"ram://switch_jax_iterator/{uuid.uuid4().hex}"
    try:
      with zipfile.ZipFile(io.BytesIO(state)) as archive:
        position = json.loads(archive.read(_POSITION))
        if position["identity"] != self.identity:
          raise PositionMismatch("it was saved for other data settings or another shard")
        if position["batches"] != batches:
          raise PositionMismatch(f"it is at batch {position['batches']}, the checkpoint's "
                                 f"record says {batches}")
        for name in archive.namelist():
          if name != _POSITION:
            with tf.io.gfile.GFile(f"{scratch}/{name}", "wb") as f:
              f.write(archive.read(name))
      self._checkpoint.read(f"{scratch}/{_PREFIX}").assert_consumed()
    except (zipfile.BadZipFile, KeyError, ValueError, AssertionError,
            tf.errors.OpError) as e:
      raise PositionMismatch(f"it does not fit this pipeline ({type(e).__name__}: "
                             f"{_first_line(e)})") from None
    finally:
      for path in tf.io.gfile.glob(f"{scratch}/*"):
        tf.io.gfile.remove(path)
    self.position = batches


def resume(make_dataset: Callable[[], tf.data.Dataset], identity: Mapping[str, Any],
           start_batch: int = 0,
           saved: Optional[bytes] = None,
           missing_because: str = "the checkpoint saved no data position",
           warn: Callable[[str], None] = lambda message: None) -> HostBatches:
  """The stream at batch `start_batch`: restored from `saved`, else replayed.

  Replaying first calls `warn` with one line saying why (`missing_because`
  when `saved` is None) and what it costs. `make_dataset` builds the stream
  (a second iterator of one dataset would be shuffled differently).
  """
  batches = HostBatches(make_dataset(), identity)
  if not start_batch:
    return batches
  why = missing_because
  if saved is not None:
    try:
      batches.restore(saved, start_batch)
      return batches
    except PositionMismatch as e:
      why = f"the saved data position cannot be used: {e}"
      batches = HostBatches(make_dataset(), identity)  # the failed restore may have moved it
  warn(f"{why}; replaying {start_batch} batches of the input to get back to its position "
       "(each is read and preprocessed again)")
  batches.skip(start_batch)
  return batches


def _first_line(error: Exception) -> str:
  """The error's first line, without TensorFlow's `{{function_node ...}}`
  prefix and `[Op:...]` suffix."""
  message = getattr(error, "message", None) or str(error)
  message = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", "", message.strip())
  return (message.splitlines() or [""])[0].rstrip(" .")[:300]
