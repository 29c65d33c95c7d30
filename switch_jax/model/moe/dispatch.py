"""The Switch layer's data path over one device's routing groups: slot
layout, all-to-alls, and the registry of expert kernels.

Everything here is a pure function of arrays, so switch_layer.py can run it
as is on one device or inside `jax.shard_map` on a mesh. On a mesh the
expert weights arrive as this device's slice (experts split over the
`expert` axis, d_ff over `model`) and the tokens reach their experts with
one all-to-all each way over `expert`, in the activation dtype.

The expert kernels, one per `ModelConfig.dispatch` value (config.DISPATCHES
says which routers each serves; measured in docs/performance.md):
- 'gather' (capacity routers): slots gathered expert-major into
  [E, G * C, d], one batched matmul per weight with the batch dim first and
  the contracting dims where XLA's GEMMs want them, so neither the matmuls
  nor their transposes copy activations.
- 'looped' (capacity routers): the same per expert in a scan, which keeps
  XLA:CPU from repacking every expert's weights on each call.
- 'compact' (top-1/top-2, CPU): only the filled slots, packed by expert,
  through the bucketed matmuls, so the slack of a capacity factor above 1
  costs no FLOPs. The all-to-all needs the fixed [E, G, C, d] buffers, so
  it runs only with every expert on this device (switch_layer.py refuses
  it on an expert mesh).
- 'ragged' (dropless): `jax.lax.ragged_dot`, a grouped GEMM on GPU and TPU;
  XLA:CPU runs it as every row times every expert.
- 'bucketed' (dropless, CPU): cpu_kernels.py's bucketed grouped matmuls.
Gathers whose index is a partial permutation get their gradient as a gather
by the inverse index, never as a scatter-add.

Shapes: G local groups, S tokens per group, E experts (E_l on this device),
C capacity, d model width, f expert width (f_l on this device).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from switch_jax.config import DISPATCHES
from switch_jax.errors import ConfigError
from switch_jax.model.moe import routing
from switch_jax.model.moe.cpu_kernels import experts_bucketed
from switch_jax.model.moe.kernels import (ExpertShards, LayerSpec, experts_gather, experts_looped,
                                          experts_ragged)

Array = jax.Array

# Each `ModelConfig.dispatch` kernel's expert FFN ('compact' runs the
# bucketed one on the filled slots only, see `_filled_slots`).
EXPERT_KERNELS = {"gather": experts_gather, "looped": experts_looped,
                  "compact": experts_bucketed, "ragged": experts_ragged,
                  "bucketed": experts_bucketed}
assert set(EXPERT_KERNELS) == set(DISPATCHES) - {"auto", "reference"}, "one vocabulary"


def check_dispatch(dispatch: str, router: str, shards: Optional[ExpertShards]) -> None:
  """Raises ConfigError, naming the fix, if kernel `dispatch` (not 'auto')
  cannot run `router` on the mesh `shards` describes (None: one device)."""
  if router not in DISPATCHES[dispatch]:
    usable = [name for name, routers in DISPATCHES.items() if router in routers]
    serves = ("the dropless router's path" if DISPATCHES[dispatch] == ("dropless",)
              else f"for the routers {DISPATCHES[dispatch]}")
    raise ConfigError(f"dispatch {dispatch!r} is {serves}; router {router!r} uses one of "
                      f"{usable}")
  if dispatch == "reference" and shards is not None:
    raise ConfigError("dispatch 'reference' runs on one device; use 'auto' on a mesh")
  if dispatch == "compact" and shards is not None and shards.num_expert_shards > 1:
    raise ConfigError(f"dispatch 'compact' packs the filled slots of experts on one device, "
                      f"but the mesh splits the experts over {shards.num_expert_shards} "
                      f"devices; use 'auto', 'looped' or 'gather' there")


@jax.custom_vjp
def take_rows(x: Array, index: Array, inverse: Array) -> Array:
  """<dtype>[M, d] rows `x[index]` of <dtype>[N, d]; index <int32>[M] in
  [0, N], where N reads a zero row.

  `inverse` <int32>[N, J] lists for each row n every m with index[m] == n
  (M where there are fewer than J), so the gradient is a gather too.
  """
  return _take(x, index)


def _take(x: Array, index: Array) -> Array:
  padded = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])
  return padded.at[index].get(mode="promise_in_bounds")


take_rows.defvjp(lambda x, index, inverse: (_take(x, index), inverse),
                 lambda inverse, g: (jnp.sum(_take(g, inverse), axis=1), None, None))


def _inverse(index: Array, num_rows: int) -> Array:
  """<int32>[num_rows, 1]: where each row is read by the injective
  `index` <int32>[M] (values past the rows are dropped), M if nowhere."""
  m = index.shape[0]
  where = jnp.full((num_rows,), m, jnp.int32).at[index].set(jnp.arange(m, dtype=jnp.int32),
                                                             mode="drop")
  return where[:, None]


def _to_experts(x: Array, shards: Optional[ExpertShards]) -> Array:
  """[E, G, C, d] (all experts, my groups) -> [E / n, G * n, C, d] (my
  experts, every shard's groups): the one all-to-all of the dispatch."""
  if shards is None or shards.num_expert_shards == 1:
    return x
  return jax.lax.all_to_all(x, shards.expert_axis, split_axis=0, concat_axis=1, tiled=True)


def _from_experts(x: Array, shards: Optional[ExpertShards]) -> Array:
  """The inverse all-to-all, back to [E, G, C, d]."""
  if shards is None or shards.num_expert_shards == 1:
    return x
  return jax.lax.all_to_all(x, shards.expert_axis, split_axis=1, concat_axis=0, tiled=True)


def slot_forward(x: Array, valid: Array, probs: Array, weights: dict, spec: LayerSpec,
                 dropout_key=None, shards: Optional[ExpertShards] = None,
                 dispatch: str = "gather") -> tuple[Array, routing.RouterStats]:
  """Capacity routing: gather into [E, G, C, d] slots, run experts, gather back.

  `dispatch` is a kernel of config.DISPATCHES serving `spec.router`
  (`check_dispatch`).

  Args:
    x: <dtype>[G, S, d] tokens; valid: <bool>[G, S]; probs: <float32>[G, S, E].
    weights: expert weights, [E_l, d, f_l] / [E_l, f_l, d].
  Returns:
    <dtype>[G, S, d] (0 for dropped tokens) and this device's router stats.
  """
  check_dispatch(dispatch, spec.router, shards)
  groups, tokens, d = x.shape
  num_experts, capacity = probs.shape[-1], spec.capacity
  if spec.router == "expert_choice":
    plan, stats = routing.expert_choice_routing(probs, valid, capacity=capacity)
  else:
    plan, stats = routing.token_choice_routing(
        probs, valid, num_selected=2 if spec.router == "top2" else 1, capacity=capacity,
        batch_prioritized=spec.batch_prioritized)
  # Slot c of expert e in group g is row (e G + g) C + c: expert-major, so
  # each expert's rows are contiguous for the matmuls and the all-to-all
  # splits the leading axis. Row `num_tokens` / `num_slots` reads zeros.
  num_tokens, num_slots = groups * tokens, num_experts * groups * capacity
  group = jnp.arange(groups, dtype=jnp.int32)[:, None]
  source = jnp.where(plan.slot_token < tokens, plan.slot_token + group * tokens, num_tokens)
  source = jnp.swapaxes(source.reshape(groups, num_experts, capacity), 0, 1).reshape(-1)
  flat_x = x.reshape(num_tokens, d)
  if plan.token_slot is None:  # expert choice: a token may fill many slots
    dispatched = _take(flat_x, source)
  else:
    expert, slot = plan.token_slot // capacity, plan.token_slot % capacity
    row = jnp.where(plan.token_slot < num_experts * capacity,
                    (expert * groups + group[..., None]) * capacity + slot, num_slots)
    row = row.reshape(num_tokens, -1)  # [T, K] each token's slot rows
    if dispatch == "compact":
      out, row = _filled_slots(flat_x, source, row, weights, spec, dropout_key, shards)
      return _combine(out, row, plan.token_weight, x.shape), stats
    dispatched = take_rows(flat_x, source, row)
  local = _to_experts(dispatched.reshape(num_experts, groups, capacity, d), shards)
  out = EXPERT_KERNELS[dispatch](local.reshape(local.shape[0], -1, d), weights, spec,
                                 dropout_key, shards)
  out = _from_experts(out.reshape(local.shape), shards).reshape(num_slots, d)
  if plan.token_slot is None:
    weight = jnp.swapaxes(plan.slot_weight.reshape(groups, num_experts, capacity), 0, 1)
    weighted = out * weight.reshape(-1, 1).astype(x.dtype)
    y = jnp.zeros((num_tokens + 1, d), x.dtype).at[source].add(weighted)
    return y[:num_tokens].reshape(groups, tokens, d), stats
  return _combine(out, row, plan.token_weight, x.shape), stats


def _filled_slots(flat_x: Array, source: Array, row: Array, weights: dict, spec: LayerSpec,
                  dropout_key, shards) -> tuple[Array, Array]:
  """The 'compact' kernel: only the filled slots, packed expert by expert,
  through the bucketed matmuls, so capacity slack costs no FLOPs.

  source <int32>[E C'] each slot's token (T if empty), expert-major; row
  <int32>[T, K] each token's slot (E C' if dropped). Returns the packed
  outputs <dtype>[M, d] and each token's row in them <int32>[T, K] (M if
  dropped).
  """
  num_tokens, num_slots = flat_x.shape[0], source.shape[0]
  num_rows = min(num_slots, row.size)  # slots that can be filled at once
  filled = source < num_tokens
  # Filled slots first, still expert-major: each expert's rows contiguous.
  order = jnp.argsort(~filled, stable=True).astype(jnp.int32)[:num_rows]
  group_sizes = jnp.sum(filled.reshape(weights["wo"].shape[0], -1), axis=1, dtype=jnp.int32)
  packed_row = jnp.append(_inverse(order, num_slots)[:, 0], num_rows)[row]  # [T, K]
  rows = take_rows(flat_x, source[order], packed_row)
  return experts_bucketed(rows, group_sizes, weights, spec, dropout_key, shards), packed_row


def _combine(out: Array, row: Array, token_weight: Array, shape) -> Array:
  """Each token's gate-weighted sum of its slots' outputs (rows past the
  end of `out` read 0): <dtype>[N, d], <int32>[T, K] -> <dtype>[G, S, d]."""
  index = row.reshape(-1)
  picked = take_rows(out, index, _inverse(index, out.shape[0]))
  weight = token_weight.reshape(row.shape + (1,)).astype(out.dtype)
  return jnp.sum(picked.reshape(row.shape + (-1,)) * weight, axis=1).reshape(shape)


def dropless_forward(x: Array, valid: Array, probs: Array, weights: dict, spec: LayerSpec,
                     dropout_key=None, shards: Optional[ExpertShards] = None,
                     dispatch: str = "ragged") -> tuple[Array, routing.RouterStats]:
  """No capacity: sort this device's tokens by expert, grouped matmul, unsort.

  Without a capacity groups do not change the outputs, so all local tokens
  are sorted together; the statistics are still per group. Each token takes
  its top-1 expert, or its top-2 for `spec.router == 'top2'` (a top-2 layer
  while generating). `dispatch` is a kernel serving the dropless router
  in config.DISPATCHES.
  """
  groups, tokens, d = x.shape
  total = groups * tokens
  plan, stats = routing.dropless_routing(probs, valid,
                                         num_selected=2 if spec.router == "top2" else 1)
  # Sorted row i holds assignment order[i] (token order[i] % T, choice
  # order[i] // T); assignment a sits at row position[a].
  position = _inverse(plan.order, plan.order.shape[0])
  token_rows = position.reshape(-1, total).T  # [T, K]
  rows = take_rows(x.reshape(total, d), plan.order % total, token_rows)
  experts = EXPERT_KERNELS[dispatch]
  if shards is None or shards.num_expert_shards == 1:
    rows = experts(rows, plan.group_sizes, weights, spec, dropout_key, shards)
  else:
    rows = _ragged_exchange(rows, plan.group_sizes, weights, spec, dropout_key, shards, experts)
  per_choice = take_rows(rows, position[:, 0], plan.order[:, None]).reshape(-1, total, d)
  weight = plan.weight.reshape(total, -1).T.astype(x.dtype)  # [K, T]
  y = jnp.sum(per_choice * weight[..., None], axis=0)
  return y.reshape(groups, tokens, d), stats


def _ragged_exchange(rows: Array, group_sizes: Array, weights: dict, spec: LayerSpec,
                     dropout_key, shards: ExpertShards, experts) -> Array:
  """Dropless expert parallelism with fixed-size all-to-alls.

  Rows <dtype>[N, d], sorted by expert, go to the shard owning their expert
  in a [n, N, d] buffer (a shard can receive at most all N rows from each
  sender, so nothing is ever dropped); the receiver sorts what arrived by
  local expert, runs the grouped matmul `experts`, and sends results back
  the same way. XLA:CPU has no `ragged_all_to_all`; this costs n times its
  bytes.
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
  out = experts(recv[order], local_sizes, weights, spec, dropout_key, shards)
  out = jnp.zeros_like(out).at[order].set(out)
  back = exchange(out).reshape(n * num_rows, d)
  back = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)], axis=0)
  return back[slot]
