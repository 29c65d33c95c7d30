"""The expert FFN kernels the Switch layer runs on one device's rows.

Pure functions of arrays: on a mesh they run inside `jax.shard_map` on this
device's slice of the expert weights (experts split over the `expert`
axis, d_ff over `model`, whose partial sums `sum_over_model` adds). Each
kernel is named after the `ModelConfig.dispatch` value that runs it
(config.DISPATCHES); dispatch.py holds the registry. The CPU-only kernel,
'bucketed', is in cpu_kernels.py.

Shapes: E_l experts on this device, R rows per expert, N rows sorted by
expert, d model width, f_l expert width on this device.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ExpertShards:
  """Mesh axes the experts are split over, seen from inside `shard_map`.

  Attributes:
    expert_axis: axis splitting the experts (the all-to-all runs over it).
    num_expert_shards: its size.
    model_axis: axis splitting the experts' hidden width (outputs are
      summed over it), or None.
    device_axes: the axes to give each device its own dropout mask over.
  """
  expert_axis: str
  num_expert_shards: int
  model_axis: Optional[str]
  device_axes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """The static settings of a Switch layer's data path."""
  router: str
  activation: str
  capacity: int
  batch_prioritized: bool = False
  dropout_rate: float = 0.0


def dropout(h: Array, rate: float, key: Optional[Array], shards: Optional[ExpertShards]):
  if key is None or rate == 0.0:
    return h
  if shards is not None:  # one mask per device, not one shared by all
    for axis in shards.device_axes:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis))
  keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
  return jnp.where(keep, h / (1.0 - rate), 0.0).astype(h.dtype)


def dropout_multiplier(shape, dtype, spec: LayerSpec, key: Optional[Array],
                       shards: Optional[ExpertShards]) -> Optional[Array]:
  """`dropout` of ones: the multiplier kernels that apply dropout inside
  their own loops take (the same mask for the same key), or None."""
  if key is None or spec.dropout_rate <= 0:
    return None
  return dropout(jnp.ones(shape, dtype), spec.dropout_rate, key, shards)


def input_names(weights: dict) -> tuple[str, ...]:
  return ("wi",) if "wi" in weights else ("wi_0", "wi_1")


def activate(activation: str, pre: tuple, keep: Optional[Array] = None) -> Array:
  """The hidden units from the input projections' outputs, times the
  dropout multiplier `keep` if any."""
  h = jax.nn.relu(pre[0]) if activation == "relu" else (
      jax.nn.gelu(pre[0], approximate=True) * pre[1])
  return h if keep is None else h * keep


def sum_over_model(y: Array, shards: Optional[ExpertShards]) -> Array:
  """Each model shard holds a slice of f: its `h wo` is a partial sum."""
  if shards is not None and shards.model_axis is not None:
    return jax.lax.psum(y, shards.model_axis)
  return y


def batched_matmul(a: Array, w: Array) -> Array:
  """<dtype>[E, R, k] x [E, k, n] -> [E, R, n]. As a dot_general with the
  expert dim first XLA's layouts need no transposes (an einsum over
  [G, E, C, d] made XLA:CPU copy every activation, 1.6x slower)."""
  return lax.dot_general(a, w.astype(a.dtype), (((2,), (1,)), ((0,), (0,))))


def experts_gather(x: Array, weights: dict, spec: LayerSpec, dropout_key, shards) -> Array:
  """<dtype>[E_l, R, d] -> [E_l, R, d]: every expert on its R rows."""
  pre = tuple(batched_matmul(x, weights[name]) for name in input_names(weights))
  h = dropout(activate(spec.activation, pre), spec.dropout_rate, dropout_key, shards)
  return sum_over_model(batched_matmul(h, weights["wo"]), shards)


def experts_looped(x: Array, weights: dict, spec: LayerSpec, dropout_key, shards) -> Array:
  """`experts_gather` one expert at a time, in a scan. XLA:CPU's batched
  matmul packs every expert's weights into freshly allocated memory on
  each call (E x 4 MiB per weight here), paying page faults for all of it;
  one expert per step keeps each matmul's buffers small and reused."""
  keep = dropout_multiplier(x.shape[:2] + (weights["wo"].shape[1],), x.dtype, spec,
                            dropout_key, shards)  # experts_gather's mask

  def expert(_, inputs):
    rows, w, mask = inputs
    pre = tuple(rows @ w[name].astype(x.dtype) for name in input_names(w))
    return None, activate(spec.activation, pre, mask) @ w["wo"].astype(x.dtype)

  _, y = lax.scan(expert, None, (x, weights, keep))
  return sum_over_model(y, shards)


def experts_ragged(x: Array, group_sizes: Array, weights: dict, spec: LayerSpec, dropout_key,
                   shards) -> Array:
  """<dtype>[N, d] rows sorted by expert, <int32>[E_l] rows each -> [N, d].

  Rows past `sum(group_sizes)` come out 0.
  """
  matmul = lambda a, w: jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes)
  pre = tuple(matmul(x, weights[name]) for name in input_names(weights))
  h = dropout(activate(spec.activation, pre), spec.dropout_rate, dropout_key, shards)
  return sum_over_model(matmul(h, weights["wo"]), shards)
