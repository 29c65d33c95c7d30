"""Training checkpoints: periodic, asynchronous, keep-N, resumable on any mesh.

`MODEL_DIR/checkpoints/<step>/` holds three orbax items:
  params/     the parameter tree (also what fine-tuning and export read)
  opt_state/  the step counter and optimizer state
  meta/       JSON: the model config, the data position (batches consumed)
              and the training dataset, so a resumed run reads on exactly
              where it stopped.
Orbax writes each step into a temporary directory and renames it when
complete, so a step directory that exists is whole; the previous step is
deleted only after the next one is finalized. Restores target the current
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
import orbax.checkpoint as ocp
from etils import epath

from switch_jax import storage
from switch_jax.checkpoints import model_format
from switch_jax.config import ModelConfig

log = logging.getLogger(__name__)
ITEMS = ("params", "opt_state", "meta")


def _manager(directory: epath.Path, keep: Optional[int] = None, async_save: bool = True,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
      create=not read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


class TrainCheckpointer:
  """Saves and restores a run's state under `model_dir/checkpoints`."""

  def __init__(self, model_dir, keep: Optional[int] = 3, async_save: bool = True):
    self.directory = storage.path(model_dir) / model_format.RUN_STEPS_DIR
    self._options = (keep, async_save)
    self._manager = _manager(self.directory, keep, async_save)

  def _set_aside(self, step: int) -> epath.Path:
    """Moves an unreadable step out of the way (never deletes it), so a new
    save of that step can happen and the files stay for inspection."""
    self._manager.close()
    destination = self.directory.parent / "checkpoints_unreadable" / f"{step}-{int(time.time())}"
    destination.parent.mkdir(parents=True, exist_ok=True)
    (self.directory / str(step)).rename(destination)
    self._manager = _manager(self.directory, *self._options)
    return destination

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, config: ModelConfig, data_position: dict) -> None:
    """Starts an asynchronous save of `state` (a TrainState) at `step`."""
    meta = {"step": int(step), "model_config": config.to_json(), "data": data_position}
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
        meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state) -> Optional[tuple[int, Any, dict]]:
    """The newest step that restores cleanly, onto `abstract_state`'s shardings.

    A step whose files are damaged is reported, set aside under
    `checkpoints_unreadable/` and skipped for the one before it. Returns
    (step, state, meta), or None when there is none.
    """
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(
                {"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # orbax raises many types for damaged files
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        moved = self._set_aside(step)
        print(f"WARNING: checkpoint {step} in {self.directory} cannot be restored ({reason}); "
              f"moved it to {moved} and trying an earlier one", flush=True)
        log.warning("checkpoint %d unreadable: %s", step, reason)
        continue
      state = abstract_state.replace(step=restored.opt_state["step"], params=restored.params,
                                     opt_state=restored.opt_state["opt_state"])
      return step, state, dict(restored.meta)
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings, for restoring without allocating twice."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
