"""The plain reference Switch layer: slow, dense, obviously right.

Every expert runs on every token; a 0/1 mask built with one-hot cumulative
sums decides which outputs count. Nothing here is shared with the fast paths
in routing.py / switch_layer.py beyond the router logits and the expert
weights, so tests that hold the two equal check the fast paths' sorting,
gathering and scattering. Use it for tests and debugging, never training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from switch_jax.model.moe.routing import RouterStats

Array = jax.Array


def expert_ffn(x: Array, weights: dict, expert: int, activation: str) -> Array:
  """Expert `expert`'s FFN on every token: <dtype>[G, S, d] -> [G, S, d]."""
  dtype = x.dtype
  if activation == "relu":
    h = jax.nn.relu(x @ weights["wi"][expert].astype(dtype))
  else:
    h = (jax.nn.gelu(x @ weights["wi_0"][expert].astype(dtype), approximate=True)
         * (x @ weights["wi_1"][expert].astype(dtype)))
  return h @ weights["wo"][expert].astype(dtype)


def _choices(probs: Array, k: int) -> tuple[list[Array], list[Array]]:
  """The k best experts by repeated argmax: lists of [G, S] indices and gates."""
  indices, gates = [], []
  remaining = probs
  for _ in range(k):
    index = jnp.argmax(remaining, axis=-1)
    indices.append(index)
    gates.append(jnp.take_along_axis(probs, index[..., None], axis=-1)[..., 0])
    remaining = jnp.where(jax.nn.one_hot(index, probs.shape[-1], dtype=bool), -jnp.inf, remaining)
  return indices, gates


def _kept_masks(indices, gates, valid, num_experts, capacity, batch_prioritized):
  """Per choice, <bool>[G, S]: does that assignment get a slot?

  Slots are claimed by all first choices, then all second choices, each
  level in token order (or by descending top-1 gate), counted with a
  cumulative sum of one-hot rows.
  """
  if batch_prioritized:
    order = jnp.argsort(-gates[0], axis=-1, stable=True)
  else:
    order = jnp.broadcast_to(jnp.arange(valid.shape[1]), valid.shape)
  inverse = jnp.argsort(order, axis=-1)
  used = jnp.zeros(valid.shape[:1] + (num_experts,), jnp.int32)  # [G, E] slots taken so far
  kept = []
  for index in indices:
    one_hot = jax.nn.one_hot(index, num_experts, dtype=jnp.int32) * valid[..., None]
    one_hot = jnp.take_along_axis(one_hot, order[..., None], axis=1)  # into priority order
    position = used[:, None, :] + jnp.cumsum(one_hot, axis=1) - 1
    used = used + one_hot.sum(axis=1)
    mine = jnp.sum(position * one_hot, axis=-1)  # the rank of each token's own assignment
    mine = jnp.take_along_axis(mine, inverse, axis=1)
    kept.append(valid & (mine < capacity))
  return kept


def switch_layer(x: Array, valid: Array, logits: Array, weights: dict, *, activation: str,
                 router: str, capacity: int, batch_prioritized: bool = False
                 ) -> tuple[Array, RouterStats]:
  """The Switch layer on groups of tokens, the slow way.

  Args:
    x: <dtype>[G, S, d] tokens.
    valid: <bool>[G, S] real tokens.
    logits: <float32>[G, S, E] router logits.
    weights: expert weights {'wi' | 'wi_0', 'wi_1', 'wo'}, [E, ...].
    activation: 'relu' or 'geglu'.
    router: 'top1', 'top2', 'expert_choice' or 'dropless'.
    capacity: slots per expert per group (ignored by 'dropless').
    batch_prioritized: claim slots by descending gate.

  Returns:
    <dtype>[G, S, d] outputs and the router statistics (z-loss left 0).
  """
  probs = jax.nn.softmax(logits, axis=-1)
  num_experts = probs.shape[-1]
  w = valid.astype(jnp.float32)
  # Only groups with a real token count in the aux loss's mean.
  groups = jnp.sum(w.max(axis=1))
  if router == "expert_choice":
    combine = []  # per expert, <float32>[G, S] weight of its output for each token
    for e in range(num_experts):
      scores = jnp.where(valid, probs[..., e], -1.0)
      gate, token = jax.lax.top_k(scores, capacity)
      picked = jax.nn.one_hot(token, valid.shape[1], dtype=jnp.float32)  # [G, C, S]
      combine.append(jnp.einsum("gcs,gc->gs", picked, jnp.maximum(gate, 0.0)) * w)
    y = sum(c[..., None].astype(x.dtype) * expert_ffn(x, weights, e, activation)
            for e, c in enumerate(combine))
    chosen = jnp.stack([c > 0 for c in combine], axis=-1)  # [G, S, E]
    stats = RouterStats(
        aux_loss_sum=jnp.zeros((), jnp.float32), z_loss_sum=jnp.zeros((), jnp.float32),
        groups=groups, tokens=w.sum(), assigned=w.sum(),
        kept=jnp.sum(chosen.any(-1) * w),
        expert_counts=chosen.sum(axis=(0, 1)).astype(jnp.float32),
        confidence_sum=sum(c.sum() for c in combine))
    return y, stats

  k = 2 if router == "top2" else 1
  indices, gates = _choices(probs, k)
  if router == "dropless":
    kept = [valid] * k
  else:
    kept = _kept_masks(indices, gates, valid, num_experts, capacity, batch_prioritized)
  y = jnp.zeros_like(x)
  for e in range(num_experts):
    out = expert_ffn(x, weights, e, activation)
    for index, gate, keep in zip(indices, gates, kept):
      mask = jnp.where(keep & (index == e), gate, 0.0)
      y = y + mask[..., None].astype(x.dtype) * out

  # f_i: share of real tokens choosing i (any choice); P_i: mean probability.
  chose = sum(jax.nn.one_hot(i, num_experts) for i in indices) > 0
  f = jnp.sum(chose * w[..., None], axis=1) / jnp.maximum(w.sum(1), 1.0)[:, None]
  p = jnp.sum(probs * w[..., None], axis=1) / jnp.maximum(w.sum(1), 1.0)[:, None]
  stats = RouterStats(
      aux_loss_sum=jnp.sum(num_experts * jnp.sum(f * p, axis=-1)),
      z_loss_sum=jnp.zeros((), jnp.float32),
      groups=groups, tokens=w.sum(), assigned=w.sum() * k,
      kept=sum(jnp.sum(kp * w) for kp in kept),
      expert_counts=sum(jnp.sum(jax.nn.one_hot(i, num_experts) * w[..., None], axis=(0, 1))
                        for i in indices),
      confidence_sum=sum(jnp.sum(g * w) for g in gates))
  return y, stats
