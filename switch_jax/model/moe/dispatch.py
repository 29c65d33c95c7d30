"""The Switch layer's data path over one device's routing groups.

Everything here is a pure function of arrays, so switch_layer.py can run it
as is on one device or inside `jax.shard_map` on a mesh. On a mesh the
expert weights arrive as this device's slice (experts split over the
`expert` axis, d_ff over `model`) and the tokens reach their experts with
one all-to-all each way over `expert`, in the activation dtype.

The expert kernels (switch_layer.py picks one per backend; measured in
docs/performance.md):
- 'gather' (capacity routers): slots gathered expert-major into
  [E, G * C, d], one batched matmul per weight with the batch dim first and
  the contracting dims where XLA's GEMMs want them, so neither the matmuls
  nor their transposes copy activations.
- 'looped' (capacity routers): the same per expert in a scan, which keeps
  XLA:CPU from repacking every expert's weights on each call.
- 'compact' (top-1/top-2, CPU): only the filled slots, packed by expert,
  through the 'bucketed' matmuls below, so the slack of a capacity factor
  above 1 costs no FLOPs; with experts split over devices the all-to-all
  needs the fixed [E, G, C, d] buffers and 'looped' runs instead.
- 'ragged' (dropless): `jax.lax.ragged_dot`, a grouped GEMM on GPU and TPU;
  XLA:CPU runs it as every row times every expert.
- 'bucketed' (dropless, CPU): each expert's rows in one matmul whose height
  is the smallest of a few static sizes that holds them.
Gathers whose index is a partial permutation get their gradient as a gather
by the inverse index, never as a scatter-add.

Shapes: G local groups, S tokens per group, E experts (E_l on this device),
C capacity, d model width, f expert width (f_l on this device).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from switch_jax.model.moe import routing

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


def _dropout_multiplier(shape, dtype, spec: LayerSpec, key: Optional[Array],
                        shards: Optional[ExpertShards]) -> Optional[Array]:
  """`_dropout` of ones: the multiplier kernels that apply dropout inside
  their own loops take (the same mask for the same key), or None."""
  if key is None or spec.dropout_rate <= 0:
    return None
  return _dropout(jnp.ones(shape, dtype), spec.dropout_rate, key, shards)


def _input_names(weights: dict) -> tuple[str, ...]:
  return ("wi",) if "wi" in weights else ("wi_0", "wi_1")


def _activate(activation: str, pre: tuple, keep: Optional[Array] = None) -> Array:
  """The hidden units from the input projections' outputs, times the
  dropout multiplier `keep` if any."""
  h = jax.nn.relu(pre[0]) if activation == "relu" else (
      jax.nn.gelu(pre[0], approximate=True) * pre[1])
  return h if keep is None else h * keep


def _sum_over_model(y: Array, shards: Optional[ExpertShards]) -> Array:
  """Each model shard holds a slice of f: its `h wo` is a partial sum."""
  if shards is not None and shards.model_axis is not None:
    return jax.lax.psum(y, shards.model_axis)
  return y


def _batched_matmul(a: Array, w: Array) -> Array:
  """<dtype>[E, R, k] x [E, k, n] -> [E, R, n]. As a dot_general with the
  expert dim first XLA's layouts need no transposes (an einsum over
  [G, E, C, d] made XLA:CPU copy every activation, 1.6x slower)."""
  return lax.dot_general(a, w.astype(a.dtype), (((2,), (1,)), ((0,), (0,))))


def experts_dense(x: Array, weights: dict, spec: LayerSpec, dropout_key, shards) -> Array:
  """<dtype>[E_l, R, d] -> [E_l, R, d]: every expert on its R rows."""
  pre = tuple(_batched_matmul(x, weights[name]) for name in _input_names(weights))
  h = _dropout(_activate(spec.activation, pre), spec.dropout_rate, dropout_key, shards)
  return _sum_over_model(_batched_matmul(h, weights["wo"]), shards)


def experts_looped(x: Array, weights: dict, spec: LayerSpec, dropout_key, shards) -> Array:
  """`experts_dense` one expert at a time, in a scan. XLA:CPU's batched
  matmul packs every expert's weights into freshly allocated memory on
  each call (E x 4 MiB per weight here), paying page faults for all of it;
  one expert per step keeps each matmul's buffers small and reused."""
  keep = _dropout_multiplier(x.shape[:2] + (weights["wo"].shape[1],), x.dtype, spec,
                             dropout_key, shards)  # experts_dense's mask

  def expert(_, inputs):
    rows, w, mask = inputs
    pre = tuple(rows @ w[name].astype(x.dtype) for name in _input_names(w))
    return None, _activate(spec.activation, pre, mask) @ w["wo"].astype(x.dtype)

  _, y = lax.scan(expert, None, (x, weights, keep))
  return _sum_over_model(y, shards)


def experts_ragged(x: Array, group_sizes: Array, weights: dict, spec: LayerSpec, dropout_key,
                   shards) -> Array:
  """<dtype>[N, d] rows sorted by expert, <int32>[E_l] rows each -> [N, d].

  Rows past `sum(group_sizes)` come out 0.
  """
  matmul = lambda a, w: jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes)
  pre = tuple(matmul(x, weights[name]) for name in _input_names(weights))
  h = _dropout(_activate(spec.activation, pre), spec.dropout_rate, dropout_key, shards)
  return _sum_over_model(matmul(h, weights["wo"]), shards)


# Bucketed grouped matmul. XLA needs static shapes, so expert e's c_e rows
# run in one matmul of height `bucket(c_e)`, the smallest bucket >= c_e;
# the extra rows are computed and thrown away. Buckets step by 1/16 of the
# mean rows per expert around the mean (where a balanced router puts
# nearly every expert: ~3% wasted rows) and double outside it. One loop per
# bucket over its experts keeps the output buffers in place (a `switch`
# inside one loop copied them every iteration), and a hand-written VJP
# stands in for reverse-mode of loops with data-dependent trip counts.


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def bucket_sizes(num_rows: int, num_experts: int) -> tuple[int, ...]:
  """The static matmul heights for `num_rows` rows over `num_experts`."""
  mean = max(1, -(-num_rows // num_experts))
  step = _round_up(max(1, mean // 16), 8)
  top = _round_up(num_rows, 8)
  low, high = _round_up(3 * mean // 4, step), _round_up(3 * mean // 2, step)
  sizes = set(range(low, high + 1, step))
  size = low
  while size > 8:
    size = _round_up(size // 2, 8)
    sizes.add(size)
  size = high
  while size < top:
    size = min(2 * size, top)
    sizes.add(size)
  return tuple(sorted(s for s in sizes | {top} if s <= top))


def _bucket_pad(sizes: tuple[int, ...]) -> int:
  """Rows past the end a bucket can reach: its height minus the rows it holds."""
  return max(b - a for a, b in zip((0,) + sizes, sizes))


def _for_each_expert(sizes, group_sizes: Array, body, carry):
  """`carry = body(size, e, start, count, carry)` for every expert with rows,
  one loop per bucket."""
  starts = jnp.cumsum(group_sizes) - group_sizes
  bucket = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), group_sizes).astype(jnp.int32)
  bucket = jnp.where(group_sizes > 0, bucket, len(sizes))
  order = jnp.argsort(bucket, stable=True)
  per_bucket = jnp.bincount(bucket, length=len(sizes) + 1)
  first = jnp.cumsum(per_bucket) - per_bucket
  for b, size in enumerate(sizes):
    step = lambda i, c, size=size: body(size, order[i], starts[order[i]],
                                        group_sizes[order[i]], c)
    carry = lax.fori_loop(first[b], first[b] + per_bucket[b], step, carry)
  return carry


def _rows(a: Optional[Array], start, size: int) -> Optional[Array]:
  return None if a is None else lax.dynamic_slice_in_dim(a, start, size)


def _merge(buffer: Array, rows: Array, start, live: Array) -> Array:
  """Writes `rows` at `start`, except where not `live` (another expert's rows)."""
  old = lax.dynamic_slice_in_dim(buffer, start, rows.shape[0])
  return lax.dynamic_update_slice_in_dim(buffer, jnp.where(live, rows, old), start, 0)


def _pad_rows(a: Optional[Array], pad: int) -> Optional[Array]:
  return None if a is None else jnp.pad(a, ((0, pad), (0, 0)))


def _varying_axes(a) -> frozenset:
  return jax.typeof(a).manual_axis_type.varying


def _varying(init, *like):
  """`init` marked as varying over every mesh axis that `like` varies over:
  inside `shard_map` a loop's carry must keep one type (no-op outside)."""
  axes = set().union(*(_varying_axes(a) for a in jax.tree.leaves(like))) - _varying_axes(init)
  return lax.pcast(init, tuple(sorted(axes)), to="varying") if axes else init


def _summed_like(cotangent, primal):
  """The cotangent of an input that every shard along some axes shared (the
  weights across batch shards, the rows across model shards) sums theirs."""
  axes = _varying_axes(cotangent) - _varying_axes(primal)
  return lax.psum(cotangent, tuple(sorted(axes))) if axes else cotangent


def _expert(w: Array, e, dtype) -> Array:
  return lax.dynamic_index_in_dim(w, e, keepdims=False).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bucketed_ffn(sizes, activation, x, group_sizes, weights, keep):
  return _bucketed_fwd(sizes, activation, x, group_sizes, weights, keep)[0]


def _bucketed_fwd(sizes, activation, x, group_sizes, weights, keep):
  num_rows, d = x.shape
  pad, names = _bucket_pad(sizes), _input_names(weights)
  xp, keep = _pad_rows(x, pad), _pad_rows(keep, pad)
  f = weights["wo"].shape[1]

  def body(size, e, start, count, carry):
    out, pre = carry
    rows = _rows(xp, start, size)
    a = tuple(rows @ _expert(weights[name], e, x.dtype) for name in names)
    y = _activate(activation, a, _rows(keep, start, size)) @ _expert(weights["wo"], e, x.dtype)
    live = (jnp.arange(size) < count)[:, None]
    return _merge(out, y, start, live), tuple(_merge(p, v, start, live) for p, v in zip(pre, a))

  inputs = (x, weights, keep)
  empty = _varying(jnp.zeros((num_rows + pad, d), x.dtype), *inputs)
  pre = tuple(_varying(jnp.zeros((num_rows + pad, f), x.dtype), *inputs) for _ in names)
  out, pre = _for_each_expert(sizes, group_sizes, body, (empty, pre))
  return out[:num_rows], (xp, group_sizes, weights, keep, pre)


def _bucketed_bwd(sizes, activation, residuals, dy):
  xp, group_sizes, weights, keep, pre = residuals
  names, dtype = _input_names(weights), xp.dtype
  dyp = _pad_rows(dy, xp.shape[0] - dy.shape[0])
  t_matmul = lambda a, b, out: lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                               preferred_element_type=out)  # a^T b

  def body(size, e, start, count, carry):
    dx, dw = carry
    live = (jnp.arange(size) < count)[:, None]
    g = jnp.where(live, _rows(dyp, start, size), 0)  # other experts' rows add nothing
    a = tuple(_rows(p, start, size) for p in pre)
    mask = _rows(keep, start, size)
    h, activation_vjp = jax.vjp(lambda *a: _activate(activation, a, mask), *a)
    dw = dict(dw)
    dw["wo"] = lax.dynamic_update_index_in_dim(dw["wo"], t_matmul(h, g, dw["wo"].dtype), e, 0)
    da = activation_vjp(g @ _expert(weights["wo"], e, dtype).T)
    rows = _rows(xp, start, size)
    dx_rows = 0
    for name, da_j in zip(names, da):
      dx_rows = dx_rows + da_j @ _expert(weights[name], e, dtype).T
      dw[name] = lax.dynamic_update_index_in_dim(dw[name], t_matmul(rows, da_j, dw[name].dtype),
                                                 e, 0)
    return _merge(dx, dx_rows, start, live), dw

  inputs = (xp, weights, keep, pre, dy)
  dw = {name: _varying(jnp.zeros_like(w), *inputs) for name, w in weights.items()}
  dx = _varying(jnp.zeros_like(xp), *inputs)
  dx, dw = _for_each_expert(sizes, group_sizes, body, (dx, dw))
  dw = {name: _summed_like(g, weights[name]) for name, g in dw.items()}
  return _summed_like(dx[:dy.shape[0]], xp), None, dw, None


_bucketed_ffn.defvjp(_bucketed_fwd, _bucketed_bwd)


def experts_bucketed(x: Array, group_sizes: Array, weights: dict, spec: LayerSpec, dropout_key,
                     shards) -> Array:
  """`experts_ragged` with bucketed matmuls (same rows in and out, and the
  same dropout mask for the same key)."""
  keep = _dropout_multiplier((x.shape[0], weights["wo"].shape[1]), x.dtype, spec, dropout_key,
                             shards)
  sizes = bucket_sizes(x.shape[0], group_sizes.shape[0])
  y = _bucketed_ffn(sizes, spec.activation, x, group_sizes, weights, keep)
  return _sum_over_model(y, shards)


# Dispatch paths (ModelConfig.dispatch) and their expert kernels.
CAPACITY_KERNELS = {"gather": experts_dense, "looped": experts_looped}
DROPLESS_KERNELS = {"ragged": experts_ragged, "bucketed": experts_bucketed}


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
                 kernel: str = "gather") -> tuple[Array, routing.RouterStats]:
  """Capacity routing: gather into [E, G, C, d] slots, run experts, gather back.

  `kernel` is a key of CAPACITY_KERNELS or 'compact', which runs only the
  filled slots (see `_filled_slots`) where every expert is on this device
  and the router fills each slot once (top-1, top-2), and 'looped' else.

  Args:
    x: <dtype>[G, S, d] tokens; valid: <bool>[G, S]; probs: <float32>[G, S, E].
    weights: expert weights, [E_l, d, f_l] / [E_l, f_l, d].
  Returns:
    <dtype>[G, S, d] (0 for dropped tokens) and this device's router stats.
  """
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
    if kernel == "compact" and (shards is None or shards.num_expert_shards == 1):
      out, row = _filled_slots(flat_x, source, row, weights, spec, dropout_key, shards)
      return _combine(out, row, plan.token_weight, x.shape), stats
    dispatched = take_rows(flat_x, source, row)
  kernel = "looped" if kernel == "compact" else kernel
  local = _to_experts(dispatched.reshape(num_experts, groups, capacity, d), shards)
  out = CAPACITY_KERNELS[kernel](local.reshape(local.shape[0], -1, d), weights, spec,
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
                     kernel: str = "ragged") -> tuple[Array, routing.RouterStats]:
  """No capacity: sort this device's tokens by expert, grouped matmul, unsort.

  Without a capacity groups do not change the outputs, so all local tokens
  are sorted together; the statistics are still per group. Each token takes
  its top-1 expert, or its top-2 for `spec.router == 'top2'` (a top-2 layer
  while generating). `kernel` is a key of DROPLESS_KERNELS.
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
  experts = DROPLESS_KERNELS[kernel]
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
