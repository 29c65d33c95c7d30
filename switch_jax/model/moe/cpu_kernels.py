"""The 'bucketed' expert kernel, which exists only for XLA:CPU.

XLA:CPU runs `jax.lax.ragged_dot` as every row times every expert, so on
CPU the dropless router and the 'compact' dispatch (the filled slots of
top-1/top-2) take these grouped matmuls instead: each expert's rows in one
matmul whose height is the smallest of a few static sizes that holds them,
with a hand-written VJP. GPU and TPU use kernels.experts_ragged.

Shapes: N rows sorted by expert, E_l experts on this device, d model
width, f_l expert width on this device.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from switch_jax.model.moe.kernels import (LayerSpec, activate, dropout_multiplier, input_names,
                                          sum_over_model)

Array = jax.Array


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
  pad, names = _bucket_pad(sizes), input_names(weights)
  xp, keep = _pad_rows(x, pad), _pad_rows(keep, pad)
  f = weights["wo"].shape[1]

  def body(size, e, start, count, carry):
    out, pre = carry
    rows = _rows(xp, start, size)
    a = tuple(rows @ _expert(weights[name], e, x.dtype) for name in names)
    y = activate(activation, a, _rows(keep, start, size)) @ _expert(weights["wo"], e, x.dtype)
    live = (jnp.arange(size) < count)[:, None]
    return _merge(out, y, start, live), tuple(_merge(p, v, start, live) for p, v in zip(pre, a))

  inputs = (x, weights, keep)
  empty = _varying(jnp.zeros((num_rows + pad, d), x.dtype), *inputs)
  pre = tuple(_varying(jnp.zeros((num_rows + pad, f), x.dtype), *inputs) for _ in names)
  out, pre = _for_each_expert(sizes, group_sizes, body, (empty, pre))
  return out[:num_rows], (xp, group_sizes, weights, keep, pre)


def _bucketed_bwd(sizes, activation, residuals, dy):
  xp, group_sizes, weights, keep, pre = residuals
  names, dtype = input_names(weights), xp.dtype
  dyp = _pad_rows(dy, xp.shape[0] - dy.shape[0])
  t_matmul = lambda a, b, out: lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                               preferred_element_type=out)  # a^T b

  def body(size, e, start, count, carry):
    dx, dw = carry
    live = (jnp.arange(size) < count)[:, None]
    g = jnp.where(live, _rows(dyp, start, size), 0)  # other experts' rows add nothing
    a = tuple(_rows(p, start, size) for p in pre)
    mask = _rows(keep, start, size)
    h, activation_vjp = jax.vjp(lambda *a: activate(activation, a, mask), *a)
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
  keep = dropout_multiplier((x.shape[0], weights["wo"].shape[1]), x.dtype, spec, dropout_key,
                            shards)
  sizes = bucket_sizes(x.shape[0], group_sizes.shape[0])
  y = _bucketed_ffn(sizes, spec.activation, x, group_sizes, weights, keep)
  return sum_over_model(y, shards)
