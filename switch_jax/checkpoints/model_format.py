"""A model on disk: what `convert` writes, what training saves, and the one
resolver every `--checkpoint` goes through.

A model checkpoint (`switch-jax convert`) is a directory:

  config.json    ModelConfig.to_json()
  params/        orbax StandardCheckpointer save of the unboxed float32
                 parameter tree (the tree `EncoderDecoder.init` makes)
  metadata.json  {"format": "switch_jax.model/1", "source": ..., ...}

A training run saves `MODEL_DIR/checkpoints/<step>/` with `params/` (the
same tree) and `meta/` (JSON holding the model config) beside its optimizer
state (see train_state.py). `resolve` accepts all three spellings of
"a model": a model checkpoint, a run's MODEL_DIR (its newest complete step,
also through MODEL_DIR/checkpoints) and one step directory.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ContextManager, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from switch_jax import __version__, storage
from switch_jax.checkpoints import integrity
from switch_jax.config import ModelConfig
from switch_jax.errors import UserError
from switch_jax.model.param_count import abstract_params

FORMAT = "switch_jax.model/1"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
METADATA_FILE = "metadata.json"
RUN_STEPS_DIR = "checkpoints"  # MODEL_DIR/checkpoints/<step>/
STEP_META_DIR = "meta"  # a step's JSON item, holding "model_config"
# The --help of every flag `resolve` reads.
CHECKPOINT_HELP = ("a model checkpoint (from `switch-jax convert`), a training run's MODEL_DIR "
                   "(its newest complete step) or one step directory")


def atomic_directory(path, overwrite: bool = False,
                     marker: str = METADATA_FILE) -> ContextManager[epath.Path]:
  """Yields an empty local directory that becomes `path` on success
  (`storage.staged_directory`): locally renamed into place, on a bucket
  uploaded with `marker` last. If the block raises, `path` is untouched.

  Raises:
    UserError: `path` is a file, or a non-empty directory and not `overwrite`.
  """
  return storage.staged_directory(path, marker, overwrite)


def _expected_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  flat = traverse_util.flatten_dict(nn.unbox(abstract_params(config)))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def check_shapes(config: ModelConfig, shapes: Mapping[tuple[str, ...], tuple[int, ...]],
                 what: str) -> None:
  """Raises UserError naming every missing, unexpected or misshapen parameter."""
  expected = _expected_shapes(config)
  problems = [f"missing {'/'.join(p)}" for p in sorted(set(expected) - set(shapes))]
  problems += [f"unexpected {'/'.join(p)}" for p in sorted(set(shapes) - set(expected))]
  problems += [f"{'/'.join(p)} has shape {tuple(shapes[p])}, config expects {expected[p]}"
               for p in sorted(set(expected) & set(shapes)) if tuple(shapes[p]) != expected[p]]
  if problems:
    more = f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""
    shown = "; ".join(problems[:8]) + more
    raise UserError(f"{what} does not match its config ({len(problems)} problems): {shown}")


def write_model(directory, config: ModelConfig, params: Any,
                metadata: Optional[Mapping[str, Any]] = None) -> None:
  """Writes config.json, params/ and metadata.json into an existing `directory`.

  Args:
    directory: where to write (usually the temporary of `atomic_directory`).
    config: the model config.
    params: the parameter tree, boxed or not; saved unboxed as float32.
    metadata: JSON-serializable extras (e.g. {"source": "hf:google/switch-base-8"}).
  """
  directory = storage.path(directory)
  params = jax.tree.map(
      lambda x: x if getattr(x, "dtype", None) == np.float32 else np.asarray(x, np.float32),
      nn.unbox(params))
  check_shapes(config, {p: np.shape(v) for p, v in traverse_util.flatten_dict(params).items()},
               "the parameter tree")
  (directory / CONFIG_FILE).write_text(config.to_json() + "\n")
  meta = {**dict(metadata or {}), "format": FORMAT, "switch_jax_version": __version__}
  (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / PARAMS_DIR, params)
    checkpointer.wait_until_finished()


def save_model(path, config: ModelConfig, params: Any,
               metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> epath.Path:
  """Writes a model checkpoint at `path` atomically; returns the path.

  Raises:
    UserError: `path` is a non-empty directory (and not `overwrite`), or the
      params do not match the config. Nothing is left at `path` then.
  """
  with atomic_directory(path, overwrite) as tmp:
    write_model(tmp, config, params, metadata)
  return storage.path(path)


def read_json_object(file) -> dict:
  """A JSON file holding an object; a UserError naming the file otherwise."""
  try:
    value = json.loads(epath.Path(file).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise UserError(f"{file}: expected a JSON object")
  return value


def load_metadata(path) -> dict:
  """A model checkpoint's metadata.json, after checking its format."""
  file = storage.path(path) / METADATA_FILE
  if not file.is_file():
    raise UserError(f"{path} is not a switch_jax model checkpoint: no {METADATA_FILE}")
  meta = read_json_object(file)
  if meta.get("format") != FORMAT:
    raise UserError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}; this version of "
                    "switch_jax cannot read it")
  return meta


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where a model's config and parameters are.

  Attributes:
    path: the directory holding `params/`: a model checkpoint or a step.
    step: the training step; None for a model checkpoint.
  """
  path: epath.Path
  step: Optional[int] = None

  @property
  def params_dir(self) -> epath.Path:
    return self.path / PARAMS_DIR

  def describe(self) -> str:
    return f"{self.path} (step {self.step})" if self.step is not None else str(self.path)

  def config(self) -> ModelConfig:
    if self.step is None:
      file = self.path / CONFIG_FILE
      if not file.is_file():
        raise UserError(f"model checkpoint {self.path} has no {CONFIG_FILE}")
      text = file.read_text()
    else:
      text = _read_step_meta(self.path).get("model_config")
      if not isinstance(text, str):
        raise UserError(f"{self.path / STEP_META_DIR}: no model_config; not a switch_jax "
                        "training checkpoint")
    try:
      return ModelConfig.from_json(text)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
      raise UserError(f"{self.describe()}: not a valid model config ({e})") from None

  def check(self) -> None:
    """A training step's params/ and meta/ checked against its manifest.

    Raises:
      UserError: a file is damaged or missing; the message names it.
    """
    if self.step is not None:
      integrity.check_items(self.path, (PARAMS_DIR, STEP_META_DIR))

  def restore(self, target, *, checked: bool = False) -> Any:
    """The parameters, restored onto `target` (a tree of ShapeDtypeStructs
    with the shardings wanted); first `check()`ed unless `checked`."""
    if not checked:
      self.check()
    with ocp.StandardCheckpointer() as checkpointer:
      try:
        return checkpointer.restore(self.params_dir, target)
      except (ValueError, KeyError) as e:
        raise UserError(f"{self.params_dir} does not match the model being built: "
                        f"{str(e).splitlines()[0][:300]}") from None


def _read_step_meta(step_dir: epath.Path) -> dict:
  try:
    return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / STEP_META_DIR))
  except Exception as e:  # orbax raises many types for damaged files
    raise UserError(f"{step_dir / STEP_META_DIR}: cannot read the step's metadata "
                    f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None


def _is_step(path: epath.Path) -> bool:
  """A complete training step: params/ and meta/, and orbax finalized it."""
  return ((path / PARAMS_DIR).is_dir() and (path / STEP_META_DIR).is_dir()
          and ocp.step.is_path_finalized(path))


def _newest_step(steps_dir: epath.Path) -> Optional[epath.Path]:
  # Unfinished saves are named `<step>.orbax-checkpoint-tmp-*` (not digits)
  # locally, and lack orbax's commit marker on buckets; both are skipped.
  steps = sorted((int(p.name), p) for p in steps_dir.iterdir() if p.name.isdigit())
  return next((p for _, p in reversed(steps) if _is_step(p)), None)


def resolve(path) -> ModelSource:
  """The model a `--checkpoint` names: a model checkpoint (metadata.json), a
  training step directory, or a training run's MODEL_DIR (or its
  checkpoints/ folder), which means its newest complete step.

  Raises:
    UserError: none of these is there; the message names what was looked for.
  """
  if not path:
    raise UserError("no checkpoint given")
  path = storage.path(path)
  if not storage.is_there(path, "checkpoint", "dir"):
    raise UserError(f"checkpoint {path} does not exist (expected a model checkpoint from "
                    "`switch-jax convert`, a training run's MODEL_DIR or one of its "
                    f"{RUN_STEPS_DIR}/<step> directories)")
  if (path / METADATA_FILE).is_file():
    load_metadata(path)
    return ModelSource(path)
  if _is_step(path):
    return ModelSource(path, int(path.name) if path.name.isdigit() else None)
  for steps_dir in (path / RUN_STEPS_DIR, path):
    if steps_dir.is_dir():
      step_dir = _newest_step(steps_dir)
      if step_dir is not None:
        return ModelSource(step_dir, int(step_dir.name))
  if (path / RUN_STEPS_DIR).is_dir():
    raise UserError(f"training run {path} has no complete checkpoint in "
                    f"{path / RUN_STEPS_DIR} yet (a step is saved every CheckpointConfig.period "
                    "steps and at the end)")
  raise UserError(f"{path} is not a model: looked for {METADATA_FILE} (a model checkpoint "
                  f"from `switch-jax convert`), {PARAMS_DIR}/ with {STEP_META_DIR}/ (a training "
                  f"step) and {RUN_STEPS_DIR}/<step>/ (a training run's MODEL_DIR); found none")


def load_config(path) -> ModelConfig:
  """The ModelConfig of whatever `resolve(path)` finds."""
  return resolve(path).config()


def load_params(path, target) -> Any:
  """The parameters of whatever `resolve(path)` finds, restored onto `target`."""
  return resolve(path).restore(target)


def load_model(path) -> tuple[ModelConfig, Any]:
  """Reads the model `resolve(path)` finds onto the default device.

  Returns:
    The config and the unboxed float32 parameter tree.

  Raises:
    UserError: no model is there, its files are unreadable or fail the
      step's manifest, or a stored shape differs from the config's.
  """
  source = resolve(path)
  source.check()
  config = source.config()
  params_dir = source.params_dir
  if not params_dir.is_dir():
    raise UserError(f"model checkpoint {source.path} has no {PARAMS_DIR}/ directory")
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      stored = checkpointer.metadata(params_dir).item_metadata.tree
    except Exception as e:  # orbax raises many types for a damaged directory
      raise UserError(f"{params_dir}: cannot read the parameter checkpoint "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    check_shapes(config, {p: tuple(m.shape) for p, m in
                          traverse_util.flatten_dict(stored).items()}, f"{params_dir}")
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = traverse_util.unflatten_dict({
      p: jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding)
      for p, shape in _expected_shapes(config).items()})
  return config, source.restore(target, checked=True)
