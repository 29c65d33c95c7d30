"""The Switch layer's data path over one device's routing groups.

Everything here is a pure function of arrays, so switch_layer.py can run it
as is on one device or inside `jax.shard_map` on a mesh. On a mesh the
expert weights arrive as this device's slice (experts split over the
`expert` axis, d_ff over `model`) and the tokens reach their experts with
one all-to-all each way over `expert`, in the activation dtype.

Shapes: G local groups, S tokens per group, E experts (E_l on this device),
C capacity, d model width, f expert width (f_l on this device).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from switch_jax import routing

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


def _dropout(h: Array, rate: float, key: Optional[Array], shards: Optional[ExpertShards]):
  if key is None or rate == 0.0:
    return h
  if shards is not None:  # one mask per device, not one shared by all
    for axis in shards.device_axes:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis))
  keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
  return jnp.where(keep, h / (1.0 - rate), 0.0).astype(h.dtype)


def _hidden(x: Array, weights: dict, activation: str, matmul) -> Array:
  dtype = x.dtype
  if activation == "relu":
    return jax.nn.relu(matmul(x, weights["wi"].astype(dtype)))
  return (jax.nn.gelu(matmul(x, weights["wi_0"].astype(dtype)), approximate=True)
          * matmul(x, weights["wi_1"].astype(dtype)))


def _sum_over_model(y: Array, shards: Optional[ExpertShards]) -> Array:
  """Each model shard holds a slice of f: its `h wo` is a partial sum."""
  if shards is not None and shards.model_axis is not None:
    return jax.lax.psum(y, shards.model_axis)
  return y


def experts_dense(x: Array, weights: dict, spec: LayerSpec, dropout_key, shards) -> Array:
  """<dtype>[G', E_l, C, d] -> [G', E_l, C, d]: every expert on its slots."""
  einsum = lambda a, w: jnp.einsum("gecd,edf->gecf", a, w)
  h = _dropout(_hidden(x, weights, spec.activation, einsum), spec.dropout_rate, dropout_key,
               shards)
  return _sum_over_model(jnp.einsum("gecf,efd->gecd", h, weights["wo"].astype(x.dtype)), shards)


def experts_ragged(x: Array, group_sizes: Array, weights: dict, spec: LayerSpec, dropout_key,
                   shards) -> Array:
  """<dtype>[N, d] rows sorted by expert, <int32>[E_l] rows each -> [N, d].

  Rows past `sum(group_sizes)` come out 0.
  """
  matmul = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)
  h = _dropout(_hidden(x, weights, spec.activation, matmul), spec.dropout_rate, dropout_key,
               shards)
  return _sum_over_model(jax.lax.ragged_dot(h, weights["wo"].astype(x.dtype), group_sizes), shards)


def _to_experts(x: Array, shards: Optional[ExpertShards]) -> Array:
  """[G, E, C, d] (all experts, my groups) -> [G * n, E / n, C, d] (my
  experts, every shard's groups): the one all-to-all of the dispatch."""
  if shards is None or shards.num_expert_shards == 1:
    return x
  return jax.lax.all_to_all(x, shards.expert_axis, split_axis=1, concat_axis=0, tiled=True)


def _from_experts(x: Array, shards: Optional[ExpertShards]) -> Array:
  """The inverse all-to-all, back to [G, E, C, d]."""
  if shards is None or shards.num_expert_shards == 1:
    return x
  return jax.lax.all_to_all(x, shards.expert_axis, split_axis=0, concat_axis=1, tiled=True)


def slot_forward(x: Array, valid: Array, probs: Array, weights: dict, spec: LayerSpec,
                 dropout_key=None, shards: Optional[ExpertShards] = None
                 ) -> tuple[Array, routing.RouterStats]:
  """Capacity routing: gather into [G, E, C, d] slots, run experts, gather back.

  Args:
    x: <dtype>[G, S, d] tokens; valid: <bool>[G, S]; probs: <float32>[G, S, E].
    weights: expert weights, [E_l, d, f_l] / [E_l, f_l, d].
  Returns:
    <dtype>[G, S, d] (0 for dropped tokens) and this device's router stats.
  """
  groups, tokens, d = x.shape
  num_experts = probs.shape[-1]
  if spec.router == "expert_choice":
    plan, stats = routing.expert_choice_routing(probs, valid, capacity=spec.capacity)
  else:
    plan, stats = routing.token_choice_routing(
        probs, valid, num_selected=2 if spec.router == "top2" else 1, capacity=spec.capacity,
        batch_prioritized=spec.batch_prioritized)
  padded = jnp.concatenate([x, jnp.zeros((groups, 1, d), x.dtype)], axis=1)
  dispatched = jnp.take_along_axis(padded, plan.slot_token[..., None], axis=1)
  dispatched = dispatched.reshape(groups, num_experts, spec.capacity, d)
  out = _from_experts(experts_dense(_to_experts(dispatched, shards), weights, spec, dropout_key,
                                    shards), shards)
  out = out.reshape(groups, num_experts * spec.capacity, d)
  if plan.token_slot is None:  # expert choice: a token may fill many slots
    weighted = out * plan.slot_weight[..., None].astype(x.dtype)
    y = jnp.zeros((groups, tokens + 1, d), x.dtype)
    y = jax.vmap(lambda acc, idx, val: acc.at[idx].add(val))(y, plan.slot_token, weighted)
    return y[:, :tokens], stats
  out = jnp.concatenate([out, jnp.zeros((groups, 1, d), x.dtype)], axis=1)
  y = jnp.zeros_like(x)
  for k in range(plan.token_slot.shape[-1]):
    picked = jnp.take_along_axis(out, plan.token_slot[..., k, None], axis=1)
    y = y + picked * plan.token_weight[..., k, None].astype(x.dtype)
  return y, stats


def dropless_forward(x: Array, valid: Array, probs: Array, weights: dict, spec: LayerSpec,
                     dropout_key=None, shards: Optional[ExpertShards] = None
                     ) -> tuple[Array, routing.RouterStats]:
  """No capacity: sort this device's tokens by expert, grouped matmul, unsort.

  Without a capacity groups do not change the outputs, so all local tokens
  are sorted together; the statistics are still per group.
  """
  groups, tokens, d = x.shape
  total = groups * tokens
  plan, stats = routing.dropless_routing(probs, valid)
  rows = x.reshape(total, d)[plan.order % total]
  if shards is None or shards.num_expert_shards == 1:
    rows = experts_ragged(rows, plan.group_sizes, weights, spec, dropout_key, shards)
  else:
    rows = _ragged_exchange(rows, plan.group_sizes, weights, spec, dropout_key, shards)
  per_choice = jnp.zeros_like(rows).at[plan.order].set(rows).reshape(-1, total, d)  # [K, T, d]
  weight = plan.weight.reshape(total, -1).T.astype(x.dtype)  # [K, T]
  y = jnp.sum(per_choice * weight[..., None], axis=0)
  return y.reshape(groups, tokens, d), stats


def _ragged_exchange(rows: Array, group_sizes: Array, weights: dict, spec: LayerSpec,
                     dropout_key, shards: ExpertShards) -> Array:
  """Dropless expert parallelism with fixed-size all-to-alls.

  Rows <dtype>[N, d], sorted by expert, go to the shard owning their expert
  in a [n, N, d] buffer (a shard can receive at most all N rows from each
  sender, so nothing is ever dropped); the receiver sorts what arrived by
  local expert, runs the grouped matmul, and sends results back the same
  way. XLA:CPU has no `ragged_all_to_all`; this costs n times its bytes.
  """
  n = shards.num_expert_shards
  num_rows, d = rows.shape
  local_experts = group_sizes.shape[0] // n
  expert_of_row = jnp.repeat(jnp.arange(group_sizes.shape[0]), group_sizes,
                             total_repeat_length=num_rows)
  real = jnp.arange(num_rows) < jnp.sum(group_sizes)
  dest = jnp.where(real, expert_of_row // local_experts, n)  # padding rows go nowhere
  shard_sizes = jnp.bincount(dest, length=n + 1)[:n]
  shard_start = jnp.cumsum(shard_sizes) - shard_sizes
  slot = jnp.where(real, dest * num_rows + jnp.arange(num_rows) - shard_start[jnp.minimum(dest, n - 1)],
                   n * num_rows)
  send = jnp.zeros((n * num_rows + 1, d), rows.dtype).at[slot].set(rows)[:-1]
  send_expert = jnp.full((n * num_rows + 1,), local_experts, jnp.int32).at[slot].set(
      (expert_of_row % local_experts).astype(jnp.int32))[:-1]
  exchange = lambda a: jax.lax.all_to_all(a.reshape((n, num_rows) + a.shape[1:]),
                                          shards.expert_axis, 0, 0, tiled=True)
  recv = exchange(send).reshape(n * num_rows, d)
  recv_expert = exchange(send_expert).reshape(n * num_rows)
  order = jnp.argsort(recv_expert, stable=True)
  local_sizes = jnp.bincount(recv_expert, length=local_experts + 1)[:local_experts]
  out = experts_ragged(recv[order], local_sizes, weights, spec, dropout_key, shards)
  out = jnp.zeros_like(out).at[order].set(out)
  back = exchange(out).reshape(n * num_rows, d)
  back = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)], axis=0)
  return back[slot]
