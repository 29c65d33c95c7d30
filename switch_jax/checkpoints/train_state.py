"""Training checkpoints: periodic, asynchronous, keep-N, resumable on any mesh.

`MODEL_DIR/checkpoints/<step>/` holds orbax items:
  params/     the parameter tree (also what fine-tuning and export read)
  opt_state/  the step counter and optimizer state
  meta/       JSON: the model config, the data position (batches consumed)
              and the training dataset, so a resumed run reads on exactly
              where it stopped
  data/       each host's input iterator state (see data_position.py)
and manifest.sha256.json, the hash of every file (see integrity.py).
Orbax writes each step into a temporary directory and renames it when
complete (on a bucket: writes commit_success.txt last), so a step directory
that exists is whole; the previous step is deleted only after the next one
is finalized. A restore checks the step against its manifest first; a step
that fails it, or fails to restore, is set aside for the one before. A save
that fails (full disk, lost permission) raises a one-line UserError naming
the step and the last complete one, at the save or, for an asynchronous
save, at the next save or close. Restores target the current
mesh's shardings, so a run can resume on a different mesh shape. Reading a
run's model (its params and config) for eval, export or fine-tuning goes
through `model_format` (`load_config`, `load_params`, `resolve`), like any
other `--checkpoint`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from switch_jax import storage
from switch_jax.checkpoints import integrity, model_format, quiet_failures
from switch_jax.checkpoints.data_position import (ITEM as DATA_ITEM, DataPositionRestore,
                                                  DataPositionSave, SavedPosition)
from switch_jax.config import ModelConfig
from switch_jax.errors import UserError

log = logging.getLogger(__name__)

quiet_failures.install()  # a failed save is our one line, not orbax's tracebacks
ITEMS = ("params", "opt_state", "meta", DATA_ITEM)


def _manager(directory: epath.Path, keep: Optional[int] = None, async_save: bool = True,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
      create=not read_only, cleanup_tmp_directories=not read_only,
      temporary_path_class=integrity.temporary_path_class(directory))
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


class TrainCheckpointer:
  """Saves and restores a run's state under `model_dir/checkpoints`."""

  def __init__(self, model_dir, keep: Optional[int] = 3, async_save: bool = True):
    self.directory = storage.path(model_dir) / model_format.RUN_STEPS_DIR
    self._options = (keep, async_save)
    self._manager = _manager(self.directory, keep, async_save)
    self._in_flight: Optional[int] = None  # an asynchronous save not yet known to be whole

  def _set_aside(self, step: int) -> epath.Path:
    """Moves an unreadable step out of the way (never deletes it), so a new
    save of that step can happen and the files stay for inspection. On
    several hosts (one shared MODEL_DIR) process 0 moves it, named by its
    clock, and the others wait for the move before listing the steps again."""
    self._manager.close()
    stamp = _from_process_0(int(time.time()))
    destination = self.directory.parent / "checkpoints_unreadable" / f"{step}-{stamp}"
    if jax.process_index() == 0:
      destination.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"switch_jax_set_aside_{step}_{stamp}")
    self._manager = _manager(self.directory, *self._options)
    return destination

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, config: ModelConfig, data_position: dict,
           data_state: Optional[bytes] = None) -> None:
    """Starts an asynchronous save of `state` (a TrainState) at `step`, with
    this host's data iterator bytes `data_state` (none: the step has no
    `data/` item, and a resume replays the input)."""
    meta = {"step": int(step), "model_config": config.to_json(), "data": data_position}
    self.wait()  # a failure of the save before this one surfaces here, named for its step
    items = {} if data_state is None else {DATA_ITEM: DataPositionSave(data_state)}
    try:
      self._manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params),
          opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
          meta=ocp.args.JsonSave(meta), **items), force=True)
    except Exception as e:  # disk full, permission lost, a bucket error
      raise self._save_failed(step, e) from None
    self._in_flight = step if self._options[1] else None

  def wait(self) -> None:
    """Waits for the save in flight.

    Raises:
      UserError: it failed (see `_save_failed`).
    """
    step, self._in_flight = self._in_flight, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # an asynchronous save's failure surfaces late, here
      raise self._save_failed(step, e) from None

  def _complete_steps(self) -> str:
    """The steps on disk now (the manager's own list counts a failed
    asynchronous save and forgets the steps it meant to delete)."""
    try:
      self._manager.reload()
      steps = self.steps()
    except Exception as e:  # the bucket that failed the save may fail this too
      return f"the checkpoints could not be listed ({storage.describe_error(e)})"
    if not steps:
      return "there is no complete checkpoint yet"
    return f"the last complete checkpoint is step {steps[-1]}, intact"

  def _save_failed(self, step: Optional[int], error: Exception) -> UserError:
    """The one-line error of a failed save. Orbax left that step unfinished (a
    temporary directory locally, a step without commit_success.txt on a
    bucket), which no restore takes and the next run's start removes."""
    which = f"checkpoint {step}" if step is not None else "a checkpoint"
    if isinstance(error, TimeoutError):  # orbax's barrier: another host did not finish its part
      advice = ("Another host did not finish writing its part in time (slow storage, a stalled "
                "host); run the same command again on every host")
    else:
      advice = "Free space or restore access, then run the same command again"
    return UserError(
        f"saving {which} in {self.directory} failed ({storage.describe_error(error)}); "
        f"{self._complete_steps()}. {advice} to resume from it")

  def restore_latest(self, abstract_state
                     ) -> Optional[tuple[int, Any, dict, Optional[SavedPosition]]]:
    """The newest step that restores cleanly, onto `abstract_state`'s shardings.

    A step whose files are damaged is reported, set aside under
    `checkpoints_unreadable/` and skipped for the one before it. Returns
    (step, state, meta, this host's saved data position or None when the
    step has no `data/` item), or None when there is no step.
    """
    for step in reversed(self.steps()):
      if not self._intact(step):
        continue
      has_data = (self.directory / str(step) / DATA_ITEM).is_dir()
      items = {DATA_ITEM: DataPositionRestore()} if has_data else {}
      problem = None
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(
                {"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
            meta=ocp.args.JsonRestore(), **items))
      except Exception as e:  # orbax raises many types for damaged files
        problem = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
      if not _all_agree(problem is None):  # one host could not restore it: every host moves on
        self._report_unreadable(step, f"cannot be restored ({problem})" if problem
                                else "cannot be restored on another host")
        continue
      state = abstract_state.replace(step=restored.opt_state["step"], params=restored.params,
                                     opt_state=restored.opt_state["opt_state"])
      return step, state, dict(restored.meta), restored.get(DATA_ITEM)
    return None

  def _report_unreadable(self, step: int, why: str) -> None:
    moved = self._set_aside(step)
    print(f"WARNING: checkpoint {step} in {self.directory} {why}; moved it to {moved} and "
          "trying an earlier one", flush=True)
    log.warning("checkpoint %d unreadable: %s", step, why)

  def _intact(self, step: int) -> bool:
    """Checks step `step` against its manifest before anything reads it; a
    step that fails is reported and set aside. A step saved before manifests
    existed passes, with one line saying it is unverified."""
    directory = self.directory / str(step)
    if not integrity.has_manifest(directory):
      print(f"checkpoint {step} in {self.directory} has no {integrity.MANIFEST} (saved before "
            "switch_jax wrote manifests); restoring it unverified", flush=True)
      return True
    problem = None
    if jax.process_index() == 0:  # the step is shared: one host reads it whole
      try:
        problem = integrity.verify(directory)
      except OSError as e:
        problem = f"cannot be read ({storage.describe_error(e)})"
    if _all_agree(problem is None):
      return True
    self._report_unreadable(step, f"fails its manifest: {problem or 'as process 0 found'}")
    return False

  def close(self) -> None:
    """Finishes the save in flight, then closes.

    Raises:
      UserError: that save failed.
    """
    try:
      self.wait()
    except UserError:
      try:  # orbax's background parts may fail again on closing: the first error is the one
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-exception-caught
        log.warning("closing the checkpoint manager after a failed save: %s",
                    storage.describe_error(e))
      raise
    try:
      self._manager.close()
    except Exception as e:  # a last write (orbax's step metadata) that failed
      raise self._save_failed(None, e) from None


def _all_agree(ok: bool) -> bool:
  """Whether every host's `ok` is true (each host passes its own); one host: `ok`."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _from_process_0(value: int) -> int:
  """Process 0's `value` (an int32), on every host."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings, for restoring without allocating twice."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
