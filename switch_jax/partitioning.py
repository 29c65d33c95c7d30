"""Device meshes `('data', 'expert', 'model')` and the logical axis rules
that place the model on them (SPEC section 3, t5x MoE layout).

The batch is split over `('expert', 'data')`; expert weights `[E, d, f]`
over `expert` (and f over `model`); other weights are replicated or split
over `model`. Every check here runs before anything is compiled, and names
the fix.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from switch_jax.config import ModelConfig
from switch_jax.errors import ConfigError

MESH_AXES = ("data", "expert", "model")
EXPERT_AXIS = "expert"  # splits the experts; the Switch layer's all-to-alls run over it
BATCH_AXES = (EXPERT_AXIS, "data")  # the batch is split over both (t5x MoE)

# logical axis -> mesh axis (None: replicated).
LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("expert", EXPERT_AXIS),
    ("unmodeled", None),
    ("relpos_buckets", None),
    ("length", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """(data, expert, model) with at most one -1 meaning "the rest"."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3:
    raise ConfigError(f"mesh shape must have 3 entries (data, expert, model), got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"mesh shape {shape}: use positive sizes and at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ConfigError(f"mesh shape {shape} needs a multiple of {known} devices, but "
                      f"{num_devices} are available; pick sizes whose product divides "
                      f"{num_devices}, or on a CPU emulate them with --num_cpu_devices={known} "
                      "(e.g. mesh/cpu8.gin needs --num_cpu_devices=8)")
  resolved = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(resolved) != num_devices:
    raise ConfigError(f"mesh shape {shape} uses {math.prod(resolved)} devices but "
                      f"{num_devices} are available; use -1 for one axis to take the rest")
  return resolved


def check_fits(config: ModelConfig, mesh_shape: Sequence[int],
               global_batch_size: Optional[int] = None) -> None:
  """Raises ConfigError if the model or batch cannot be laid out on the mesh."""
  data, expert, model = mesh_shape
  if config.is_moe and expert > config.num_experts:
    raise ConfigError(f"the mesh has {expert} expert shards but the model has only "
                      f"{config.num_experts} experts; use at most {config.num_experts} "
                      f"(and a divisor of it) for the expert axis")
  if config.is_moe and config.num_experts % expert:
    raise ConfigError(f"{config.num_experts} experts cannot be split evenly over {expert} "
                      f"expert shards; use a divisor of {config.num_experts}")
  for name, size in (("d_ff", config.d_ff), ("num_heads", config.num_heads),
                     ("vocab_size", config.vocab_size)):
    if size % model:
      raise ConfigError(f"{name}={size} is not divisible by the model axis ({model}); "
                        f"use a model axis that divides it")
  shards = data * expert
  if global_batch_size is not None and global_batch_size % shards:
    raise ConfigError(f"batch size {global_batch_size} cannot be split over {shards} batch "
                      f"shards (data {data} x expert {expert}); use a multiple of {shards}")


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A ('data', 'expert', 'model') mesh with Auto axes (the compiler places
  what the logical rules leave open; the Switch layer uses shard_map)."""
  devices = jax.devices() if devices is None else list(devices)
  resolved = resolve_mesh_shape(shape, len(devices))
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(resolved, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
  return Mesh(np.asarray(devices).reshape(resolved), MESH_AXES,
              axis_types=(AxisType.Auto,) * 3)


def logical_to_sharding(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a tree of logically-annotated (boxed) values."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def _key_names(path) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr((k,)) for k in path)


def shardings_like_params(tree, abstract_params, param_shardings, mesh: Mesh):
  """Shardings for optimizer state: each leaf follows the parameter it
  belongs to (matched by path suffix), so expert statistics stay split over
  `expert` like the expert weights. A leaf of the parameter's rank whose
  axes are the parameter's or 1 (a factored second moment kept with size-1
  reduced axes) takes the parameter's spec with those axes unsplit; anything
  else (step counters, placeholders) is replicated.
  """
  by_path = {}
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(param_shardings)
  for (path, leaf), sharding in zip(flat_params, flat_shardings):
    by_path[_key_names(path)] = (tuple(leaf.shape), sharding.spec)

  def place(path, leaf):
    names = _key_names(path)
    shape = tuple(leaf.shape)
    for start in range(len(names)):
      if names[start:] in by_path:
        param_shape, spec = by_path[names[start:]]
        spec = tuple(spec) + (None,) * (len(param_shape) - len(spec))
        if len(shape) == len(param_shape) and all(
            s in (p, 1) for s, p in zip(shape, param_shape)):
          return NamedSharding(mesh, P(*(a if s == p else None
                                         for a, s, p in zip(spec, shape, param_shape))))
        break
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(place, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays [B, ...] split over ('expert', 'data')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def mesh_shape(mesh: Mesh) -> tuple[int, int, int]:
  return tuple(mesh.shape[a] for a in MESH_AXES)
