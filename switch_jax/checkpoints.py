"""The on-disk model checkpoint: what `convert` writes and the trainer restores.

A model checkpoint is a directory:

  config.json    ModelConfig.to_json()
  params/        orbax StandardCheckpointer save of the unboxed float32
                 parameter tree (the tree `EncoderDecoder.init` makes)
  metadata.json  {"format": "switch_jax.model/1", "source": ..., ...}

A trainer stores its own state beside these (say `train_state/`): it writes
everything inside one `atomic_directory` block, calling `write_model` for
the model part, and restores the model part with `load_model`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from switch_jax import __version__
from switch_jax.config import ModelConfig
from switch_jax.errors import UserError
from switch_jax.param_count import abstract_params

FORMAT = "switch_jax.model/1"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
METADATA_FILE = "metadata.json"


@contextlib.contextmanager
def atomic_directory(path, overwrite: bool = False) -> Iterator[Path]:
  """Yields an empty temporary sibling of `path`, renamed to `path` on success.

  If the block raises, the temporary directory is removed and `path` is
  untouched, so a reader never sees a half-written checkpoint.

  Raises:
    UserError: `path` is a file, or a non-empty directory and not `overwrite`.
  """
  path = Path(path).absolute()
  if path.exists() and not path.is_dir():
    raise UserError(f"{path} exists and is not a directory")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise UserError(f"{path} exists and is not empty; choose a new path or pass --overwrite")
  path.parent.mkdir(parents=True, exist_ok=True)
  # mkdir (not mkdtemp) so the directory gets the umask's permissions, not 0700.
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
  tmp.mkdir()
  try:
    yield tmp
    if path.exists():
      old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
      path.rename(old)
      try:
        tmp.rename(path)
      except BaseException:
        old.rename(path)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      tmp.rename(path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


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
  directory = Path(directory).absolute()
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
               metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> Path:
  """Writes a model checkpoint at `path` atomically; returns the path.

  Raises:
    UserError: `path` is a non-empty directory (and not `overwrite`), or the
      params do not match the config. Nothing is left at `path` then.
  """
  with atomic_directory(path, overwrite) as tmp:
    write_model(tmp, config, params, metadata)
  return Path(path)


def read_json_object(file: Path) -> dict:
  """A JSON file holding an object; a UserError naming the file otherwise."""
  try:
    value = json.loads(Path(file).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise UserError(f"{file}: expected a JSON object")
  return value


def load_metadata(path) -> dict:
  """The checkpoint's metadata.json, after checking its format."""
  path = Path(path)
  if not path.is_dir():
    raise UserError(f"model checkpoint {path} does not exist (expected a directory with "
                    f"{CONFIG_FILE}, {PARAMS_DIR}/ and {METADATA_FILE})")
  file = path / METADATA_FILE
  if not file.is_file():
    raise UserError(f"{path} is not a switch_jax model checkpoint: no {METADATA_FILE}")
  meta = read_json_object(file)
  if meta.get("format") != FORMAT:
    raise UserError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}; this version of "
                    "switch_jax cannot read it")
  return meta


def load_config(path) -> ModelConfig:
  """The checkpoint's ModelConfig."""
  file = Path(path) / CONFIG_FILE
  if not file.is_file():
    raise UserError(f"model checkpoint {path} has no {CONFIG_FILE}")
  try:
    return ModelConfig.from_json(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
    raise UserError(f"{file}: not a valid model config ({e})") from None


def load_model(path) -> tuple[ModelConfig, Any]:
  """Reads a model checkpoint.

  Returns:
    The config and the unboxed float32 parameter tree (jax arrays on the
    default device).

  Raises:
    UserError: the directory, config.json, metadata.json or params/ is
      missing or unreadable, or a stored shape differs from the config's.
  """
  load_metadata(path)
  config = load_config(path)
  params_dir = (Path(path) / PARAMS_DIR).absolute()
  if not params_dir.is_dir():
    raise UserError(f"model checkpoint {path} has no {PARAMS_DIR}/ directory")
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
    params = checkpointer.restore(params_dir, target)
  return config, params
