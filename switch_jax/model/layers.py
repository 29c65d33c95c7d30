"""T5 building blocks: norms, embeddings, attention, relative position bias, FFN.

Parameters are float32 with logical axis names (see partitioning.py for how
the names map onto a device mesh); activations run in the config's dtype.
No biases anywhere, as in T5.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from switch_jax.config import ModelConfig

Array = jax.Array


def activation_dtype(config: ModelConfig):
  return jnp.dtype(config.dtype)


def kernel_init(scale: float, in_axis=-2, out_axis=-1, batch_axis: Sequence[int] = ()):
  """Truncated normal with stddev sqrt(scale / fan_in) (SPEC: s = 0.1)."""
  return nn.initializers.variance_scaling(
      scale, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis)


def project(x: Array, w: Array, in_dims: int = 1) -> Array:
  """<dtype>[..., *K] x [*K, *N] -> <dtype>[..., *N] (K: w's first `in_dims`
  dims), as one 2-D matmul.

  An einsum over [B, L, d] activations made XLA:CPU lay out the weight
  gradient's operand transposed and fuse that transpose into the backward
  elementwise ops (the GeGLU derivative: 133 ms of a 3.4 s Base-shaped step,
  fwd+bwd of the MLP 1.34x slower); flattened to [B L, d], it does not.
  """
  k = int(np.prod(w.shape[:in_dims]))
  lead, out = x.shape[:x.ndim - in_dims], w.shape[in_dims:]
  y = x.reshape(-1, k) @ w.reshape(k, -1)
  return y.reshape(lead + out)


def param(module: nn.Module, name: str, init, shape, axes: Sequence[Optional[str]]):
  """A float32 parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, jnp.float32)


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, computed in float32."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (x32 * scale).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding <float32>[vocab, d], also the tied output projection."""
  vocab_size: int
  features: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = param(self, "embedding", nn.initializers.normal(stddev=1.0),
                           (self.vocab_size, self.features), ("vocab", "embed"))

  def __call__(self, tokens: Array) -> Array:
    """<int32>[B, L] -> <dtype>[B, L, d]."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """<dtype>[B, L, d] -> <float32>[B, L, vocab] logits, computed in float32
    under any policy (see `vocab_logits`)."""
    return jnp.einsum("bld,vd->blv", x.astype(jnp.float32), self.embedding)


def vocab_logits(x: Array, kernel: Array) -> Array:
  """<dtype>[B, L, d] x <float32>[d, vocab] -> <float32>[B, L, vocab].

  The output projection runs in float32 whatever the activation dtype, as
  in t5x: bfloat16 keeps 8 bits of mantissa, so logits near 10 round by up
  to 0.03 and the cross-entropy moves by ~0.01 nats per token at vocab 32128.
  """
  return project(x.astype(jnp.float32), kernel)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's log-spaced buckets of `memory_position - query_position`.

  Half the buckets hold exact small distances, the rest grow logarithmically
  up to `max_distance`; bidirectional splits buckets by sign, causal maps
  all future positions to bucket 0.
  """
  # float32 arithmetic, as Mesh-TF and Hugging Face, so bucket edges agree.
  ret = np.zeros_like(relative_position)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide="ignore"):
    val_if_large = max_exact + (
        np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
        / np.float32(np.log(np.float32(max_distance) / np.float32(max_exact)))
        * np.float32(num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
  """Per-head additive attention bias, shared by all layers of a stack."""
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query_length: int, key_length: int, query_offset: Array | int = 0) -> Array:
    """<dtype>[1, H, query_length, key_length] for queries at
    `query_offset + arange(query_length)` (the offset is a traced decode step)."""
    table = param(self, "rel_embedding", kernel_init(1.0, in_axis=-1, out_axis=-2),
                  (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))
    # Buckets for every (query, key) pair of a full-length square; decoding
    # slices the row of the current step.
    size = max(query_length, key_length)
    rel = np.arange(size)[None, :] - np.arange(size)[:, None]
    buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    buckets = jnp.asarray(buckets[:, :key_length], jnp.int32)
    buckets = jax.lax.dynamic_slice_in_dim(buckets, query_offset, query_length, axis=0)
    bias = jnp.take(table, buckets, axis=1)  # [H, q, k]
    return bias[None].astype(self.dtype)


@jax.custom_vjp
def _add_shared_bias(logits: Array, bias: Array) -> Array:
  return logits + bias


def _add_shared_bias_bwd(_, g: Array):
  # The bias's gradient sums over the batch as a matrix-vector product:
  # XLA:CPU's reduce over the leading axis of [4, 12, 512, 512] took 218 ms
  # of a Base-shaped train step (fwd+bwd of the add and a softmax over
  # [4, 12, 512, 512]: 65 ms as a reduce, 14 ms as this product).
  ones = jnp.ones(g.shape[:1], g.dtype)
  return g, jnp.einsum("b,b...->...", ones, g)[None]


_add_shared_bias.defvjp(lambda logits, bias: (logits + bias, None), _add_shared_bias_bwd)


def add_bias(logits: Array, bias: Array) -> Array:
  """<float32>[B, H, q, k] attention logits plus a [1|B, H, q, k] bias."""
  if bias.shape[0] == 1 and logits.shape[0] > 1:
    return _add_shared_bias(logits, bias)
  return logits + bias


class MultiHeadAttention(nn.Module):
  """T5 attention: no 1/sqrt(d) scaling (folded into the query init), no biases.

  With `decode=True` the keys and values of earlier steps live in the
  'cache' collection; the first call (with the full-length input) sizes it.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Optional[Array],
               mask: Optional[Array], *, deterministic: bool, decode: bool = False) -> Array:
    """inputs <dtype>[B, Lq, d], [B, Lk, d]; bias [1|B, H, Lq, Lk]; mask
    <bool>[B, 1, Lq, Lk] (True = attend) -> <dtype>[B, Lq, d]."""
    cfg = self.config
    dtype = activation_dtype(cfg)
    d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
    qkv_init = kernel_init(cfg.init_scale, in_axis=0, out_axis=(1, 2))
    query_init = kernel_init(cfg.init_scale / hd, in_axis=0, out_axis=(1, 2))
    wq = param(self, "query", query_init, (d, h, hd), ("embed", "heads", "kv"))
    wk = param(self, "key", qkv_init, (d, h, hd), ("embed", "heads", "kv"))
    wv = param(self, "value", qkv_init, (d, h, hd), ("embed", "heads", "kv"))
    wo = param(self, "out", kernel_init(cfg.init_scale, in_axis=(0, 1), out_axis=2),
               (h, hd, d), ("heads", "kv", "embed"))
    q = project(inputs_q, wq.astype(dtype))
    k = project(inputs_kv, wk.astype(dtype))
    v = project(inputs_kv, wv.astype(dtype))
    if decode:
      k, v, mask = self._update_cache(k, v, mask)
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k).astype(jnp.float32)
    if bias is not None:
      logits = add_bias(logits, bias.astype(jnp.float32))
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqt,bthk->bqhk", weights, v)
    return project(out, wo.astype(dtype), in_dims=2)

  def _update_cache(self, k, v, mask):
    """Writes this step's key/value at the cache index; returns the full cache."""
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:  # the sizing call: attend over the input as given
      return k, v, mask
    batch, max_length = cached_key.value.shape[:2]
    if k.shape[1] != 1:
      raise ValueError(f"decoding feeds one token per step, got {k.shape[1]}")
    index = cache_index.value
    cached_key.value = jax.lax.dynamic_update_slice_in_dim(cached_key.value, k, index, axis=1)
    cached_value.value = jax.lax.dynamic_update_slice_in_dim(cached_value.value, v, index, axis=1)
    cache_index.value = index + 1
    step_mask = (jnp.arange(max_length) <= index)[None, None, None, :]
    step_mask = jnp.broadcast_to(step_mask, (batch, 1, 1, max_length))
    mask = step_mask if mask is None else jnp.logical_and(mask, step_mask)
    return cached_key.value, cached_value.value, mask


def ffn_activation(config: ModelConfig, x: Array, wi: dict) -> Array:
  """The FFN's hidden activation: relu(x wi) or gelu(x wi_0) * (x wi_1)."""
  wi = {name: w.astype(x.dtype) for name, w in wi.items()}
  if config.ffn_activation == "relu":
    return jax.nn.relu(project(x, wi["wi"]))
  return jax.nn.gelu(project(x, wi["wi_0"]), approximate=True) * project(x, wi["wi_1"])


def ffn_input_names(config: ModelConfig) -> tuple[str, ...]:
  return ("wi",) if config.ffn_activation == "relu" else ("wi_0", "wi_1")


class MlpBlock(nn.Module):
  """The dense T5 FFN, `wo(act(wi x))`, ReLU or gated GELU."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    cfg = self.config
    init = kernel_init(cfg.init_scale)
    wi = {name: param(self, name, init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
          for name in ffn_input_names(cfg)}
    wo = param(self, "wo", init, (cfg.d_ff, cfg.d_model), ("mlp", "embed"))
    h = ffn_activation(cfg, x, wi)
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return project(h, wo.astype(x.dtype))


def attention_mask(query_valid: Array, key_valid: Array, causal: bool = False,
                   query_segments: Optional[Array] = None,
                   key_segments: Optional[Array] = None) -> Array:
  """<bool>[B, 1, Lq, Lk]: both positions real, same packed segment, and
  (causal) the key not after the query."""
  mask = query_valid[:, None, :, None] & key_valid[:, None, None, :]
  if causal:
    lq, lk = query_valid.shape[1], key_valid.shape[1]
    mask = mask & (jnp.arange(lq)[:, None] >= jnp.arange(lk)[None, :])[None, None]
  if query_segments is not None and key_segments is not None:
    mask = mask & (query_segments[:, None, :, None] == key_segments[:, None, None, :])
  return mask

