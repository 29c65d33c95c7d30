"""Routing: which expert slot each token goes to, as pure functions.

Shapes: G groups, S tokens per group, E experts, K choices per token,
C expert capacity (slots per expert per group), d model width.

A capacity router (top-1, top-2, expert choice) returns a `SlotRouting`:
for every expert slot, the token that fills it and its combine weight. The
Switch layer gathers tokens into an `[G, E, C, d]` buffer, runs the experts
and gathers (or, for expert choice, scatter-adds) the results back; no
tensor of size tokens x experts x capacity is ever built. The dropless
router returns a `SortedRouting` for a grouped matmul instead.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SlotRouting:
  """Where tokens go under a fixed expert capacity.

  Attributes:
    slot_token: <int32>[G, E * C] token index in [0, S) filling each slot,
      or S for an empty slot (gathers a zero row).
    slot_weight: <float32>[G, E * C] combine weight of each slot, 0 if empty.
    token_slot: <int32>[G, S, K] slot index in [0, E * C) of each token's
      k-th choice, or E * C if that choice was dropped. None for expert
      choice, where a token can fill any number of slots.
    token_weight: <float32>[G, S, K] combine weight of each choice (0 when
      dropped). None for expert choice.
    capacity: C, a Python int.
  """
  slot_token: jax.Array
  slot_weight: jax.Array
  token_slot: Optional[jax.Array]
  token_weight: Optional[jax.Array]
  capacity: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class SortedRouting:
  """Dropless routing: every (token, choice) of every group sorted by expert.

  Attributes:
    order: <int32>[K * T] assignment ids (T = G * S tokens, choice-major:
      assignment a is flat token a % T, choice a // T), sorted by expert
      with padding tokens last.
    group_sizes: <int32>[E] number of (real) assignments per expert.
    weight: <float32>[G, S, K] combine weight of each choice (0 for padding).
  """
  order: jax.Array
  group_sizes: jax.Array
  weight: jax.Array


@flax.struct.dataclass
class RouterStats:
  """Additive sums over a layer's groups, so that device shards can `psum`
  them before dividing (all float32).

  Attributes:
    aux_loss_sum: sum over groups of each group's load-balancing loss
      `E * sum_i f_i P_i` (unscaled by alpha; f_i counted before dropping;
      0 for a group with no real token).
    z_loss_sum: sum over real tokens of `logsumexp(logits)^2`.
    groups: number of groups with at least one real token, which the aux
      loss averages over: an all-padding group (an eval batch's padding
      rows) has no balance to measure and would pull the mean toward 0.
    tokens: number of real tokens.
    assigned: real (token, choice) assignments; for expert choice, the real
      tokens (each should reach some expert).
    kept: assignments that got a slot; for expert choice, tokens some expert
      picked.
    expert_counts: <float32>[E] assignments per expert before dropping (for
      expert choice, picks per expert).
    confidence_sum: summed router probability of those assignments.
    max_abs_logit: the largest |router logit| (a max, not a sum): how close
      the router is to overflowing, reported when a step goes non-finite.
  """
  aux_loss_sum: jax.Array
  z_loss_sum: jax.Array
  groups: jax.Array
  tokens: jax.Array
  assigned: jax.Array
  kept: jax.Array
  expert_counts: jax.Array
  confidence_sum: jax.Array
  max_abs_logit: jax.Array = 0.0

  def psum(self, axis_names) -> "RouterStats":
    summed = jax.tree.map(lambda v: jax.lax.psum(v, axis_names), self)
    # A diagnostic, not a loss: no gradient flows through it (pmax has none).
    largest = jax.lax.pmax(jax.lax.stop_gradient(self.max_abs_logit), axis_names)
    return summed.replace(max_abs_logit=largest)

  def metrics(self) -> dict[str, jax.Array]:
    """What every Switch layer reports: aux_loss (mean over real groups), z_loss
    (mean over tokens), fraction_dropped, expert_fraction [E] and
    router_confidence."""
    picks = jnp.maximum(jnp.sum(self.expert_counts), 1.0)
    return {
        "aux_loss": self.aux_loss_sum / jnp.maximum(self.groups, 1.0),
        "z_loss": self.z_loss_sum / jnp.maximum(self.tokens, 1.0),
        "fraction_dropped": (self.assigned - self.kept) / jnp.maximum(self.assigned, 1.0),
        "expert_fraction": self.expert_counts / picks,
        "router_confidence": self.confidence_sum / picks,
        "max_abs_logit": jnp.asarray(self.max_abs_logit, jnp.float32),
    }


def expert_capacity(tokens_per_group: int, num_experts: int, capacity_factor: float,
                    min_capacity: int = 4, explicit: Optional[int] = None) -> int:
  """Slots per expert per group: `max(round(cf * S / E), min)`, at most S.

  The same for top-1 and top-2, as in Mesh-TF's `_top_2_gating` and
  flaxformer: the factor counts slots against tokens, not against
  (token, choice) assignments, so top-2 needs cf 2.0 to hold every choice
  at perfect balance (the paper's "MoE top-2, cf 2.0"). `round` follows
  flaxformer (Mesh-TF truncates). More than S slots can never fill, since
  each token takes at most one slot of any expert.
  """
  if explicit is not None:
    return int(min(explicit, tokens_per_group))
  capacity = int(round(capacity_factor * tokens_per_group / num_experts))
  return int(min(max(capacity, min_capacity), tokens_per_group))


def router_logits(x: jax.Array, kernel: jax.Array, *, dtype=jnp.float32,
                  jitter_noise: float = 0.0, jitter_key: Optional[jax.Array] = None) -> jax.Array:
  """<float32>[G, S, E] router logits from inputs <any>[G, S, d].

  The router runs in `dtype` (float32: the paper's selective precision).
  Jitter multiplies the router *inputs* by U(1 - eps, 1 + eps), as the
  Mesh-TF code does, only when a key is given (training).
  """
  x = x.astype(dtype)
  if jitter_noise > 0 and jitter_key is not None:
    x = x * jax.random.uniform(jitter_key, x.shape, dtype, 1.0 - jitter_noise, 1.0 + jitter_noise)
  logits = jnp.einsum("gsd,de->gse", x, kernel.astype(dtype))
  return logits.astype(jnp.float32)


def load_balancing_loss(router_probs: jax.Array, expert_index: jax.Array,
                        valid: Optional[jax.Array] = None) -> jax.Array:
  """`E * sum_i f_i P_i`, averaged over groups with a real token (1.0 at
  perfect balance)."""
  groups = router_probs.shape[0] if valid is None else real_groups(valid)
  return jnp.sum(_group_balance(router_probs, expert_index, valid)) / jnp.maximum(groups, 1.0)


def _group_balance(router_probs, expert_index, valid=None) -> jax.Array:
  """<float32>[G] each group's `E * sum_i f_i P_i`.

  Args:
    router_probs: <float32>[G, S, E] router probabilities.
    expert_index: <int32>[G, S, K] chosen experts, *before* capacity drops.
    valid: <bool>[G, S] real (non-padding) tokens; None means all.
  """
  num_experts = router_probs.shape[-1]
  if valid is None:
    valid = jnp.ones(router_probs.shape[:-1], bool)
  w = valid.astype(jnp.float32)
  count = jnp.maximum(w.sum(-1, keepdims=True), 1.0)  # [G, 1]
  # f_i: fraction of tokens that picked expert i with any of their choices.
  chose = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32).max(axis=-2)
  f = (chose * w[..., None]).sum(-2) / count
  p = (router_probs * w[..., None]).sum(-2) / count
  return num_experts * jnp.sum(f * p, axis=-1)


def router_z_loss(logits: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
  """Mean over real tokens of `logsumexp(logits)^2` (ST-MoE)."""
  if valid is None:
    valid = jnp.ones(logits.shape[:-1], bool)
  return _z_loss_sum(logits, valid) / jnp.maximum(jnp.sum(valid), 1)


def real_groups(valid: jax.Array) -> jax.Array:
  """<float32>[] groups of <bool>[G, S] `valid` with at least one real token."""
  return jnp.sum(jnp.any(valid, axis=-1)).astype(jnp.float32)


def _z_loss_sum(logits: jax.Array, valid: jax.Array) -> jax.Array:
  z = jax.nn.logsumexp(logits, axis=-1) ** 2
  return jnp.sum(z * valid.astype(jnp.float32))


def with_z_loss(stats: RouterStats, logits: jax.Array, valid: jax.Array) -> RouterStats:
  """Adds the z-loss sum (and the largest |logit|) of <float32>[G, S, E]
  logits over real tokens."""
  largest = jax.lax.stop_gradient(jnp.max(jnp.where(valid[..., None], jnp.abs(logits), 0.0)))
  return stats.replace(z_loss_sum=_z_loss_sum(logits, valid), max_abs_logit=largest)


def top_k_choices(router_probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """<int32>[G, S, K] experts and <float32>[G, S, K] gates, best first.

  Gates are the raw router probabilities (flaxformer's choice; GShard
  renormalizes top-2 gates to sum to 1).
  """
  gate, index = jax.lax.top_k(router_probs, k)
  return index.astype(jnp.int32), gate


def _priority_order(gate: jax.Array, batch_prioritized: bool) -> jax.Array:
  """<int32>[G, S * K] the order in which assignments claim slots.

  All first choices come before all second choices; within a choice level,
  token order, or descending top-1 gate for batch-prioritized routing.
  """
  num_groups, num_tokens, k = gate.shape
  if batch_prioritized:
    tokens = jnp.argsort(-gate[..., 0], axis=-1, stable=True)  # [G, S]
  else:
    tokens = jnp.broadcast_to(jnp.arange(num_tokens), (num_groups, num_tokens))
  choice_offsets = (jnp.arange(k) * num_tokens)[None, :, None]
  return (tokens[:, None, :] + choice_offsets).reshape(num_groups, k * num_tokens).astype(jnp.int32)


def positions_in_expert(expert_index: jax.Array, valid: jax.Array, num_experts: int,
                        order: jax.Array) -> jax.Array:
  """<int32>[G, S, K] rank of each assignment among those to the same expert.

  Ranks count assignments in priority `order`. Padding tokens get rank
  S * K (never kept) and do not use up capacity. Computed by a stable sort
  by expert, O(S K log(S K)) per group, never a one-hot over experts.
  """
  num_groups, num_tokens, k = expert_index.shape
  n = num_tokens * k
  flat_expert = jnp.swapaxes(expert_index, 1, 2).reshape(num_groups, n)  # choice-major
  flat_valid = jnp.tile(valid, (1, k))
  key = jnp.where(flat_valid, flat_expert, num_experts)  # padding sorts last
  key_in_order = jnp.take_along_axis(key, order, axis=1)
  perm = jnp.argsort(key_in_order, axis=1, stable=True)  # into priority order
  sorted_key = jnp.take_along_axis(key_in_order, perm, axis=1)
  counts = jax.vmap(lambda s: jnp.bincount(s, length=num_experts + 1))(sorted_key)
  starts = jnp.cumsum(counts, axis=1) - counts  # [G, E + 1]
  rank_sorted = jnp.arange(n)[None, :] - jnp.take_along_axis(starts, sorted_key, axis=1)
  rank_sorted = jnp.where(sorted_key < num_experts, rank_sorted, n)
  flat_index = jnp.take_along_axis(order, perm, axis=1)  # assignment id of each sorted entry
  rank = jnp.zeros((num_groups, n), jnp.int32)
  rank = jax.vmap(lambda r, i, v: r.at[i].set(v))(rank, flat_index, rank_sorted.astype(jnp.int32))
  return jnp.swapaxes(rank.reshape(num_groups, k, num_tokens), 1, 2)


def token_choice_routing(router_probs: jax.Array, valid: jax.Array, *, num_selected: int,
                         capacity: int, batch_prioritized: bool = False
                         ) -> tuple[SlotRouting, RouterStats]:
  """Top-k token-choice routing under a capacity (top-1 is Switch routing).

  Args:
    router_probs: <float32>[G, S, E].
    valid: <bool>[G, S] real tokens.
    num_selected: K, 1 for Switch, 2 for the paper's MoE baseline.
    capacity: C slots per expert per group.
    batch_prioritized: claim slots in order of descending gate, not token order.

  Returns:
    The slot routing and the layer statistics (z_loss left at 0; the caller
    has the logits).
  """
  num_groups, num_tokens, num_experts = router_probs.shape
  expert_index, gate = top_k_choices(router_probs, num_selected)
  order = _priority_order(gate, batch_prioritized)
  position = positions_in_expert(expert_index, valid, num_experts, order)
  kept = valid[..., None] & (position < capacity)
  overflow = num_experts * capacity
  token_slot = jnp.where(kept, expert_index * capacity + position, overflow).astype(jnp.int32)
  token_weight = jnp.where(kept, gate, 0.0)

  # Invert token -> slot into slot -> token; the overflow slot is cut off.
  token_ids = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None],
                               (num_tokens, num_selected))

  def fill(slots, weights):
    slot_token = jnp.full((overflow + 1,), num_tokens, jnp.int32).at[slots].set(token_ids)
    slot_weight = jnp.zeros((overflow + 1,), jnp.float32).at[slots].set(weights)
    return slot_token[:overflow], slot_weight[:overflow]

  slot_token, slot_weight = jax.vmap(fill)(token_slot, token_weight)
  routing = SlotRouting(slot_token, slot_weight, token_slot, token_weight, capacity)
  stats = _token_choice_stats(router_probs, expert_index, gate, kept, valid)
  return routing, stats


def _token_choice_stats(router_probs, expert_index, gate, kept, valid) -> RouterStats:
  num_experts = router_probs.shape[-1]
  w = jnp.broadcast_to(valid.astype(jnp.float32)[..., None], expert_index.shape)
  counts = jnp.zeros((num_experts,), jnp.float32).at[expert_index.reshape(-1)].add(w.reshape(-1))
  return RouterStats(
      aux_loss_sum=jnp.sum(_group_balance(router_probs, expert_index, valid)),
      z_loss_sum=jnp.zeros((), jnp.float32),
      groups=real_groups(valid),
      tokens=jnp.sum(valid).astype(jnp.float32),
      assigned=jnp.sum(w),
      kept=jnp.sum(kept * w),
      expert_counts=counts,
      confidence_sum=jnp.sum(gate * w),
  )


def expert_choice_routing(router_probs: jax.Array, valid: jax.Array, *, capacity: int
                          ) -> tuple[SlotRouting, RouterStats]:
  """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

  Balanced by construction, so there is no load-balancing loss. It looks at
  every token of the group at once, so it is not causal: encoder only.
  Padding tokens are chosen last and then carry weight 0.
  """
  num_groups, num_tokens, num_experts = router_probs.shape
  scores = jnp.where(valid[..., None], router_probs, -1.0)
  weight, token = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [G, E, C]
  picked_valid = jnp.take_along_axis(
      jnp.broadcast_to(valid[:, None, :], (num_groups, num_experts, num_tokens)), token, axis=2)
  weight = jnp.where(picked_valid, weight, 0.0)
  token = jnp.where(picked_valid, token, num_tokens).astype(jnp.int32)
  routing = SlotRouting(token.reshape(num_groups, -1), weight.reshape(num_groups, -1),
                        None, None, capacity)
  w = valid.astype(jnp.float32)
  covered = jnp.zeros((num_groups, num_tokens + 1), jnp.float32)
  covered = jax.vmap(lambda c, t: c.at[t].set(1.0))(covered, routing.slot_token)[:, :num_tokens]
  stats = RouterStats(
      aux_loss_sum=jnp.zeros((), jnp.float32),
      z_loss_sum=jnp.zeros((), jnp.float32),
      groups=real_groups(valid),
      tokens=jnp.sum(w),
      assigned=jnp.sum(w),
      kept=jnp.sum(covered * w),
      expert_counts=picked_valid.sum(axis=(0, 2)).astype(jnp.float32),
      confidence_sum=jnp.sum(weight),
  )
  return routing, stats


def dropless_routing(router_probs: jax.Array, valid: jax.Array, *, num_selected: int = 1
                     ) -> tuple[SortedRouting, RouterStats]:
  """Top-k routing with no capacity: every real token reaches its expert(s).

  All G * S tokens are sorted together (one grouped matmul); groups only
  shape the load-balancing statistics, as for the capacity routers.
  """
  num_experts = router_probs.shape[-1]
  expert_index, gate = top_k_choices(router_probs, num_selected)
  key = jnp.where(valid[..., None], expert_index, num_experts)  # padding sorts last
  flat_key = jnp.moveaxis(key, -1, 0).reshape(-1)  # choice-major over all tokens
  order = jnp.argsort(flat_key, stable=True).astype(jnp.int32)
  group_sizes = jnp.bincount(flat_key, length=num_experts + 1)[:num_experts]
  weight = jnp.where(valid[..., None], gate, 0.0)
  routing = SortedRouting(order, group_sizes.astype(jnp.int32), weight)
  kept = jnp.broadcast_to(valid[..., None], gate.shape)
  return routing, _token_choice_stats(router_probs, expert_index, gate, kept, valid)
