"""Starting one model from another's weights.

- `exact`: the same architecture (fine-tuning, resuming elsewhere).
- `upcycle` (sparse upcycling, Komatsuzaki et al. 2023): a Switch model from
  a dense checkpoint of the same shape; every expert starts as a copy of the
  dense FFN it replaces, routers start fresh.
- `shared`: copy every parameter the two models have at the same path with
  the same shape, keep the fresh initialization for the rest (distillation:
  the dense student takes the teacher's non-expert weights, SPEC section 3).

All functions work on flat {path: array} views of unboxed parameter trees
and are jittable, so they run sharded on the mesh.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from switch_jax.errors import ConfigError

MODES = ("exact", "upcycle", "shared")


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(dict(tree))


def _name(path) -> str:
  return "/".join(path)


def copy_matching(source: Any, fresh: Any) -> tuple[Any, list[str]]:
  """`fresh` with every parameter `source` has at the same path and shape
  replaced by the source's. Returns the tree and the copied paths."""
  src, out, copied = _flat(source), _flat(fresh), []
  for path, value in out.items():
    if path in src and src[path].shape == value.shape:
      out[path] = src[path]
      copied.append(_name(path))
  return traverse_util.unflatten_dict(out), copied


def upcycle(dense: Any, fresh: Any) -> Any:
  """A Switch model's parameters from a dense model's (same d_model, d_ff,
  layers): shared weights copied, each expert stack `[E, ...]` filled with
  the dense FFN at that layer, routers kept from `fresh`."""
  src, out = _flat(dense), _flat(fresh)
  problems = []
  for path, value in out.items():
    if "router" in path:
      continue
    if "experts" in path:
      i = path.index("experts")
      dense_path = path[:i] + path[i + 1:]  # .../mlp/experts/wi -> .../mlp/wi
      if dense_path not in src or src[dense_path].shape != value.shape[1:]:
        problems.append(f"{_name(path)} needs {_name(dense_path)} of shape {value.shape[1:]}")
        continue
      out[path] = jnp.broadcast_to(src[dense_path], value.shape).astype(value.dtype)
    elif path in src and src[path].shape == value.shape:
      out[path] = src[path]
    else:
      problems.append(f"{_name(path)} {value.shape} has no match in the dense checkpoint")
  if problems:
    raise ConfigError("cannot upcycle: the dense checkpoint does not have this model's shape ("
                      + "; ".join(problems[:5]) + "). Use the dense model's config with "
                      "num_experts > 0.")
  return traverse_util.unflatten_dict(out)


def check_exact(source: Any, fresh: Any) -> None:
  src, want = _flat(source), _flat(fresh)
  missing = sorted(set(want) - set(src))
  if missing:
    raise ConfigError(f"the checkpoint lacks {len(missing)} parameters of this model "
                      f"(e.g. {_name(missing[0])}); for a dense checkpoint into a Switch "
                      "model use train.initialization = 'upcycle'")
