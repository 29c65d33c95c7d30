"""The Switch layer: a router and E expert FFNs in place of one dense FFN.

Data path for a capacity router (top-1, top-2, expert choice):
  tokens [B, L, d] -> groups [G, S, d] -> router logits [G, S, E]
  -> slot routing (routing.py) -> gather into [G, E, C, d]
  -> experts (one batched einsum per weight) -> gather (or scatter-add)
  back to [G, S, d], scaled by the gate -> [B, L, d].
The dropless router sorts tokens by expert and runs `jax.lax.ragged_dot`.
`dispatch='reference'` runs reference.py's plain loop over experts instead,
which the tests hold every fast path equal to.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from switch_jax import reference, routing
from switch_jax.config import ModelConfig
from switch_jax.errors import ConfigError
from switch_jax.layers import (activation_dtype, ffn_activation, ffn_input_names, kernel_init,
                               param)

Array = jax.Array
MOE_COLLECTION = "moe"


def num_groups(num_tokens: int, group_size: int, multiple_of: int = 1) -> int:
  """The fewest groups of at most `group_size` tokens that split the tokens
  evenly, rounded so that `multiple_of` batch shards each hold whole groups."""
  if num_tokens % multiple_of:
    raise ConfigError(f"{num_tokens} tokens cannot be split over {multiple_of} batch shards")
  groups = max(multiple_of, math.ceil(num_tokens / group_size))
  while num_tokens % groups or groups % multiple_of:
    groups += 1
  return groups


class Router(nn.Module):
  """Router logits `x W_r` in the router dtype (float32), W_r ~ N(0, 2e-2)."""
  num_experts: int
  jitter_noise: float = 0.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    """<any>[G, S, d] -> <float32>[G, S, E]."""
    kernel = param(self, "kernel", nn.initializers.normal(stddev=2e-2),
                   (x.shape[-1], self.num_experts), ("embed", "unmodeled"))
    key = None
    if not deterministic and self.jitter_noise > 0:
      key = self.make_rng("dropout")
    return routing.router_logits(x, kernel, dtype=jnp.dtype(self.dtype),
                                 jitter_noise=self.jitter_noise, jitter_key=key)


class Experts(nn.Module):
  """E expert FFNs with stacked weights <float32>[E, d, f] and [E, f, d]."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
    init = kernel_init(cfg.init_scale, in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.wi = {name: param(self, name, init, (e, d, f), ("expert", "embed", "mlp"))
               for name in ffn_input_names(cfg)}
    self.wo = param(self, "wo", init, (e, f, d), ("expert", "mlp", "embed"))
    self.dropout = nn.Dropout(cfg.expert_dropout)

  def weights(self) -> dict:
    return {**self.wi, "wo": self.wo}

  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    """<dtype>[G, E, C, d] expert inputs -> <dtype>[G, E, C, d] outputs."""
    h = ffn_activation(self.config, x, self.wi, "gecd,edf->gecf")
    h = self.dropout(h, deterministic=deterministic)
    return jnp.einsum("gecf,efd->gecd", h, self.wo.astype(x.dtype))

  def ragged(self, x: Array, group_sizes: Array, *, deterministic: bool) -> Array:
    """<dtype>[N, d] rows sorted by expert, <int32>[E] rows per expert -> [N, d]."""
    dtype = x.dtype
    cfg = self.config
    if cfg.ffn_activation == "relu":
      h = jax.nn.relu(jax.lax.ragged_dot(x, self.wi["wi"].astype(dtype), group_sizes))
    else:
      gate = jax.lax.ragged_dot(x, self.wi["wi_0"].astype(dtype), group_sizes)
      linear = jax.lax.ragged_dot(x, self.wi["wi_1"].astype(dtype), group_sizes)
      h = jax.nn.gelu(gate, approximate=True) * linear
    h = self.dropout(h, deterministic=deterministic)
    return jax.lax.ragged_dot(h, self.wo.astype(dtype), group_sizes)


class SwitchLayer(nn.Module):
  """A Switch (mixture-of-experts) FFN.

  Attributes:
    config: the model config (router settings, sizes, dtypes).
    router_type: 'top1', 'top2', 'expert_choice' or 'dropless'.
    causal: True in a decoder; expert choice refuses to run there.
    num_batch_shards: groups are laid out so that each batch shard (device
      row of the mesh) routes only its own tokens.
  """
  config: ModelConfig
  router_type: str = "top1"
  causal: bool = False
  num_batch_shards: int = 1

  def setup(self):
    cfg = self.config
    if self.causal and self.router_type == "expert_choice":
      raise ConfigError("expert-choice routing is not causal and cannot be used in a decoder; "
                        "set ModelConfig.decoder_router to 'top1', 'top2' or 'dropless'")
    self.router = Router(cfg.num_experts, cfg.jitter_noise, cfg.router_dtype)
    self.experts = Experts(cfg)

  @property
  def dispatch(self) -> str:
    cfg = self.config
    if cfg.dispatch == "auto":
      return "ragged" if self.router_type == "dropless" else "gather"
    if self.router_type == "dropless" and cfg.dispatch == "gather":
      raise ConfigError("the dropless router has no capacity buffers: use dispatch "
                        "'ragged' (or 'reference'), or a capacity router with 'gather'")
    if self.router_type != "dropless" and cfg.dispatch == "ragged":
      raise ConfigError(f"dispatch 'ragged' is the dropless router's path; router "
                        f"{self.router_type!r} uses 'gather' (or 'reference')")
    return cfg.dispatch

  def capacity(self, tokens_per_group: int, deterministic: bool) -> int:
    cfg = self.config
    factor = cfg.eval_capacity_factor if deterministic else cfg.train_capacity_factor
    return routing.expert_capacity(
        tokens_per_group, cfg.num_experts, factor, cfg.min_expert_capacity,
        cfg.expert_capacity, num_selected=2 if self.router_type == "top2" else 1)

  def __call__(self, x: Array, valid: Optional[Array] = None, *,
               deterministic: bool = True) -> Array:
    """<dtype>[B, L, d] tokens, <bool>[B, L] real-token mask -> <dtype>[B, L, d].

    Dropped tokens get 0 (the residual connection carries them on).
    """
    cfg = self.config
    batch, length, d = x.shape
    x = x.astype(activation_dtype(cfg))
    if valid is None or not cfg.ignore_padding_tokens:
      valid = jnp.ones((batch, length), bool)
    group_size = cfg.group_size or length
    if self.router_type == "dropless":  # no capacity, so groups only cost sorting
      group_size = batch * length
    groups = num_groups(batch * length, group_size, self.num_batch_shards)
    xg = x.reshape(groups, -1, d)
    vg = valid.reshape(groups, -1)
    logits = self.router(xg, deterministic=deterministic)
    probs = jax.nn.softmax(logits, axis=-1)

    dispatch = self.dispatch
    if dispatch == "reference":
      y, stats = reference.switch_layer(
          xg, vg, logits, self.experts.weights(), activation=cfg.ffn_activation,
          router=self.router_type, capacity=self.capacity(xg.shape[1], deterministic),
          batch_prioritized=cfg.batch_prioritized_routing)
    elif dispatch == "ragged":
      y, stats = self._dropless(xg, vg, probs, deterministic)
    else:
      y, stats = self._slots(xg, vg, probs, deterministic)
    stats = stats.replace(z_loss=routing.router_z_loss(logits, vg))
    for name, value in vars(stats).items():
      self.sow(MOE_COLLECTION, name, value)
    return y.reshape(batch, length, d)

  def _slots(self, x: Array, valid: Array, probs: Array, deterministic: bool):
    """Capacity routing: gather into [G, E, C, d] slots, run experts, gather back."""
    cfg = self.config
    groups, tokens, d = x.shape
    capacity = self.capacity(tokens, deterministic)
    if self.router_type == "expert_choice":
      plan, stats = routing.expert_choice_routing(probs, valid, capacity=capacity)
    else:
      plan, stats = routing.token_choice_routing(
          probs, valid, num_selected=2 if self.router_type == "top2" else 1,
          capacity=capacity, batch_prioritized=cfg.batch_prioritized_routing)
    padded = jnp.concatenate([x, jnp.zeros((groups, 1, d), x.dtype)], axis=1)
    dispatched = jnp.take_along_axis(padded, plan.slot_token[..., None], axis=1)
    expert_out = self.experts(dispatched.reshape(groups, cfg.num_experts, capacity, d),
                              deterministic=deterministic)
    expert_out = expert_out.reshape(groups, cfg.num_experts * capacity, d)
    if plan.token_slot is None:  # expert choice: a token may fill many slots
      weighted = expert_out * plan.slot_weight[..., None].astype(x.dtype)
      y = jnp.zeros((groups, tokens + 1, d), x.dtype)
      y = jax.vmap(lambda acc, idx, val: acc.at[idx].add(val))(y, plan.slot_token, weighted)
      return y[:, :tokens], stats
    out = jnp.concatenate([expert_out, jnp.zeros((groups, 1, d), x.dtype)], axis=1)
    y = jnp.zeros_like(x)
    for k in range(plan.token_slot.shape[-1]):
      picked = jnp.take_along_axis(out, plan.token_slot[..., k, None], axis=1)
      y = y + picked * plan.token_weight[..., k, None].astype(x.dtype)
    return y, stats

  def _dropless(self, x: Array, valid: Array, probs: Array, deterministic: bool):
    """No capacity: sort all tokens by expert, grouped matmul, unsort."""
    groups, tokens, d = x.shape
    total = groups * tokens  # one sort over every token: groups only cost sorting here
    plan, stats = routing.dropless_routing(probs.reshape(1, total, -1), valid.reshape(1, total))
    flat_x = x.reshape(total, d)
    order = plan.order[0]  # [T * K] assignment ids sorted by expert
    rows = self.experts.ragged(flat_x[order % total], plan.group_sizes[0],
                               deterministic=deterministic)
    per_choice = jnp.zeros_like(rows).at[order].set(rows).reshape(-1, total, d)  # [K, T, d]
    weight = plan.weight[0].T.astype(x.dtype)  # [K, T]
    y = jnp.sum(per_choice * weight[..., None], axis=0)
    return y.reshape(groups, tokens, d), stats
