"""The Switch layer: a router and E expert FFNs in place of one dense FFN.

Data path: tokens [B, L, d] -> groups [G, S, d] -> router logits [G, S, E]
-> routing (routing.py) -> experts (dispatch.py) -> [B, L, d]. Under a mesh
(`jax.set_mesh`) with an `expert` axis the whole path runs in `shard_map`:
each device routes its own groups and one all-to-all each way moves tokens
to their experts' devices and back. `dispatch='reference'` runs
reference.py's plain loop instead, which the tests hold every fast path to.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from switch_jax.config import DISPATCHES, ModelConfig
from switch_jax.errors import ConfigError
from switch_jax.model.layers import activation_dtype, ffn_input_names, kernel_init, param
from switch_jax.model.moe import dispatch
from switch_jax.model.moe import reference
from switch_jax.model.moe import routing
from switch_jax.partitioning import BATCH_AXES, EXPERT_AXIS, LOGICAL_AXIS_RULES

Array = jax.Array
MOE_COLLECTION = "moe"
# Logical axes of the expert weights: partitioning.LOGICAL_AXIS_RULES places
# them on the mesh, for the parameters and for the layer's shard_map alike.
EXPERT_IN_AXES = ("expert", "embed", "mlp")  # wi, wi_0, wi_1 [E, d, f]
EXPERT_OUT_AXES = ("expert", "mlp", "embed")  # wo [E, f, d]


def group_layout(num_tokens: int, group_size: int, multiple_of: int = 1) -> tuple[int, int]:
  """(G, S): G groups of S <= `group_size` tokens, G / `multiple_of` on each
  batch shard, with G * S - num_tokens padding tokens (fewer than G).

  Each shard takes the fewest groups that split its tokens evenly, unless
  that is more than twice the fewest groups of at most `group_size` (a
  token count with no divisor near it: 1031 tokens would be 1031 groups of
  one token, dropless in effect, with a per-token aux loss). Then the
  shard's tokens are padded at its end to that fewest number of equal
  groups, as flaxformer pads; the padding is invalid and sliced off after.
  """
  if num_tokens % multiple_of:
    raise ConfigError(f"{num_tokens} tokens cannot be split over {multiple_of} batch shards")
  local = num_tokens // multiple_of
  fewest = max(1, math.ceil(local / group_size))
  groups = next((g for g in range(fewest, 2 * fewest + 1) if local % g == 0), fewest)
  return groups * multiple_of, math.ceil(local / groups)


def to_groups(x: Array, valid: Array, layout: tuple[int, int], shards: int
              ) -> tuple[Array, Array]:
  """<dtype>[B, L, d], <bool>[B, L] -> [G, S, d], [G, S] for `group_layout`'s
  (G, S). Padding goes at the end of each batch shard's tokens, so a shard's
  groups hold its own tokens and nothing crosses devices."""
  groups, group_tokens = layout
  d = x.shape[-1]
  xs, vs = x.reshape(shards, -1, d), valid.reshape(shards, -1)
  pad = groups // shards * group_tokens - xs.shape[1]
  if pad:
    xs = jnp.pad(xs, ((0, 0), (0, pad), (0, 0)))
    vs = jnp.pad(vs, ((0, 0), (0, pad)))  # False: padding is never routed
  return xs.reshape(groups, group_tokens, d), vs.reshape(groups, group_tokens)


def from_groups(y: Array, batch: int, length: int, shards: int) -> Array:
  """`to_groups`' inverse: <dtype>[G, S, d] -> [B, L, d], padding dropped."""
  d = y.shape[-1]
  return y.reshape(shards, -1, d)[:, :batch * length // shards].reshape(batch, length, d)


def mesh_layout(num_experts: int) -> tuple[tuple[str, ...], Optional[dispatch.ExpertShards]]:
  """The batch axes and expert sharding of the mesh in context, if any."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT_AXIS not in mesh.axis_names or math.prod(mesh.shape.values()) == 1:
    return (), None
  sizes = dict(mesh.shape)
  if num_experts % sizes[EXPERT_AXIS]:
    raise ConfigError(f"{num_experts} experts cannot be split over an expert axis of "
                      f"{sizes[EXPERT_AXIS]} devices; use a divisor of {num_experts}")
  batch_axes = tuple(a for a in BATCH_AXES if a in sizes)
  hidden_axis = dict(LOGICAL_AXIS_RULES)["mlp"]
  model_axis = hidden_axis if sizes.get(hidden_axis, 1) > 1 else None
  # Dropout masks differ per device along every axis the hidden units are
  # split over; 'model' only when it splits them (its outputs are summed).
  mask_axes = batch_axes + ((model_axis,) if model_axis else ())
  return batch_axes, dispatch.ExpertShards(EXPERT_AXIS, sizes[EXPERT_AXIS], model_axis, mask_axes)


def weight_specs(weights: dict, shards: dispatch.ExpertShards) -> dict:
  """The shard_map in_specs of the expert weights: LOGICAL_AXIS_RULES' specs,
  with the hidden axis left whole where it splits nothing."""
  def spec(logical_axes):
    axes = nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES)
    hidden = dict(LOGICAL_AXIS_RULES)["mlp"]
    return P(*(None if a == hidden and shards.model_axis is None else a for a in axes))
  return {name: spec(EXPERT_OUT_AXES if name == "wo" else EXPERT_IN_AXES) for name in weights}


class Router(nn.Module):
  """Router weights W_r <float32>[d, E], initialized N(0, 2e-2)."""
  num_experts: int
  d_model: int

  def setup(self):
    self.kernel = param(self, "kernel", nn.initializers.normal(stddev=2e-2),
                        (self.d_model, self.num_experts), ("embed", "unmodeled"))


class Experts(nn.Module):
  """E expert FFNs with stacked weights <float32>[E, d, f] and [E, f, d]."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
    init = kernel_init(cfg.init_scale, in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.wi = {name: param(self, name, init, (e, d, f), EXPERT_IN_AXES)
               for name in ffn_input_names(cfg)}
    self.wo = param(self, "wo", init, (e, f, d), EXPERT_OUT_AXES)

  def weights(self) -> dict:
    return {**self.wi, "wo": self.wo}


def auto_dispatch(router_type: str, backend: str, experts_split: bool = False) -> str:
  """The fastest kernel (a key of config.DISPATCHES) for a router on a
  backend, with the experts split over devices or not (bench/run.py
  measures them; docs/performance.md has the numbers). XLA:CPU runs
  `ragged_dot` as every row times every expert, so there the dropless
  router, and the filled slots of top-1 and top-2 ('compact', experts on
  one device), take bucketed matmuls; GPU and TPU have grouped GEMMs for
  `ragged_dot`."""
  if backend == "cpu":
    top_k = "looped" if experts_split else "compact"
    return {"dropless": "bucketed", "expert_choice": "looped"}.get(router_type, top_k)
  return "ragged" if router_type == "dropless" else "gather"


def _forward(x, valid, kernel, weights, jitter_key, dropout_key, *, spec: dispatch.LayerSpec,
             expert_kernel: str, jitter_noise: float, router_dtype: str, batch_axes, shards):
  """One device's groups through the layer: <dtype>[G, S, d] -> [G, S, d]."""
  if jitter_key is not None and shards is not None:  # fresh noise per batch shard
    for axis in batch_axes:
      jitter_key = jax.random.fold_in(jitter_key, jax.lax.axis_index(axis))
  logits = routing.router_logits(x, kernel, dtype=jnp.dtype(router_dtype),
                                 jitter_noise=jitter_noise, jitter_key=jitter_key)
  probs = jax.nn.softmax(logits, axis=-1)
  if expert_kernel == "reference":
    y, stats = reference.switch_layer(x, valid, logits, weights, activation=spec.activation,
                                      router=spec.router, capacity=spec.capacity,
                                      batch_prioritized=spec.batch_prioritized)
  elif "dropless" in DISPATCHES[expert_kernel]:
    y, stats = dispatch.dropless_forward(x, valid, probs, weights, spec, dropout_key, shards,
                                         dispatch=expert_kernel)
  else:
    y, stats = dispatch.slot_forward(x, valid, probs, weights, spec, dropout_key, shards,
                                     dispatch=expert_kernel)
  stats = routing.with_z_loss(stats, logits, valid)
  if shards is not None:
    stats = stats.psum(batch_axes)
  return y, stats


class SwitchLayer(nn.Module):
  """A Switch (mixture-of-experts) FFN.

  Attributes:
    config: the model config (router settings, sizes, dtypes).
    router_type: 'top1', 'top2', 'expert_choice' or 'dropless'.
    causal: True in a decoder; expert choice refuses to run there.
  """
  config: ModelConfig
  router_type: str = "top1"
  causal: bool = False

  def setup(self):
    cfg = self.config
    if self.causal and self.router_type == "expert_choice":
      raise ConfigError("expert-choice routing is not causal and cannot be used in a decoder; "
                        "set ModelConfig.decoder_router to 'top1', 'top2' or 'dropless'")
    self.router = Router(cfg.num_experts, cfg.d_model)
    self.experts = Experts(cfg)

  def dispatch_kernel(self, shards: Optional[dispatch.ExpertShards] = None) -> str:
    """The kernel (a key of config.DISPATCHES) this layer runs with the
    experts laid out as `shards` says (None: one device): 'auto' resolved
    for the backend, else `ModelConfig.dispatch` if it can run here; an
    unsupported choice raises ConfigError rather than running another."""
    cfg = self.config
    if cfg.dispatch == "auto":
      split = shards is not None and shards.num_expert_shards > 1
      return auto_dispatch(self.router_type, jax.default_backend(), split)
    dispatch.check_dispatch(cfg.dispatch, self.router_type, shards)
    return cfg.dispatch

  def capacity(self, tokens_per_group: int, deterministic: bool) -> int:
    """C slots per expert per group: the train factor, or at eval the eval
    factor (token choice) or `expert_choice_eval_capacity_factor` (expert
    choice; None keeps the train factor, the function it was trained as)."""
    cfg = self.config
    factor = cfg.train_capacity_factor
    if deterministic and self.router_type == "expert_choice":
      factor = cfg.expert_choice_eval_capacity_factor or factor
    elif deterministic:
      factor = cfg.eval_capacity_factor
    return routing.expert_capacity(tokens_per_group, cfg.num_experts, factor,
                                   cfg.min_expert_capacity, cfg.expert_capacity)

  def __call__(self, x: Array, valid: Optional[Array] = None, *,
               deterministic: bool = True, generating: bool = False) -> Array:
    """<dtype>[B, L, d] tokens, <bool>[B, L] real-token mask -> <dtype>[B, L, d].

    Dropped tokens get 0 (the residual connection carries them on). Sows
    the layer's router metrics into the 'moe' collection.

    `generating` (decoding.py's encoder pass and every decoder step) routes
    so that no sequence depends on the rest of its batch: a decode step's
    group is one token from each of B sequences, all fed the same start
    token at step 0, so any capacity would make them compete in row order.
    Token-choice routers then give every real token its experts with no
    capacity (the dropless data path, same choices and gates); expert
    choice, which needs a capacity, takes each sequence as its own group.
    """
    cfg = self.config
    batch, length, d = x.shape
    x = x.astype(activation_dtype(cfg))
    if valid is None or not cfg.ignore_padding_tokens:
      valid = jnp.ones((batch, length), bool)
    batch_axes, shards = mesh_layout(cfg.num_experts)
    num_batch_shards = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in batch_axes)
    expert_kernel = self.dispatch_kernel(shards)
    uncapped = generating and self.router_type != "expert_choice"
    if uncapped and "dropless" not in DISPATCHES[expert_kernel]:  # the dropless path (above)
      expert_kernel = auto_dispatch("dropless", jax.default_backend())
    group_size = length if generating else (cfg.group_size or length)
    layout = group_layout(batch * length, group_size, num_batch_shards)
    xg, vg = to_groups(x, valid, layout, num_batch_shards)

    training = not deterministic
    jitter_key = self.make_rng("dropout") if training and cfg.jitter_noise > 0 else None
    dropout_key = self.make_rng("dropout") if training and cfg.expert_dropout > 0 else None
    # The reference has no dropless top-k; a capacity of the whole group
    # never drops a token, which is the same function.
    capacity = xg.shape[1] if uncapped else self.capacity(xg.shape[1], deterministic)
    spec = dispatch.LayerSpec(self.router_type, cfg.ffn_activation, capacity,
                              cfg.batch_prioritized_routing, cfg.expert_dropout)
    forward = functools.partial(_forward, spec=spec, expert_kernel=expert_kernel,
                                jitter_noise=cfg.jitter_noise, router_dtype=cfg.router_dtype,
                                batch_axes=batch_axes, shards=shards)
    forward = functools.partial(forward, jitter_key=jitter_key, dropout_key=dropout_key)
    weights = self.experts.weights()
    if shards is None:
      y, stats = forward(xg, vg, self.router.kernel, weights)
    else:
      tokens_spec = P(batch_axes)
      y, stats = jax.shard_map(
          forward, in_specs=(tokens_spec, tokens_spec, P(), weight_specs(weights, shards)),
          out_specs=(tokens_spec, P()))(xg, vg, self.router.kernel, weights)
    for name, value in stats.metrics().items():
      self.sow(MOE_COLLECTION, name, value)
    return from_groups(y, batch, length, num_batch_shards)
