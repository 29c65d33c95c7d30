"""The T5 encoder-decoder with Switch layers at a configurable layout.

Pre-norm residual blocks; a relative position bias shared by all layers of
a stack; the token embedding shared by encoder, decoder and (tied) the
output projection, whose input is then scaled by d_model^-0.5. With
`decode=True` the decoder runs one token per call against a key/value cache.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from switch_jax.config import ModelConfig
from switch_jax.model.layers import (Embed, MlpBlock, MultiHeadAttention, RelativePositionBias,
                                     RMSNorm, activation_dtype, attention_mask, kernel_init,
                                     param, vocab_logits)
from switch_jax.model.moe.switch_layer import SwitchLayer

Array = jax.Array


def _ffn_sublayer(config: ModelConfig, layer: int, decoder: bool, x: Array, valid: Array,
                  drop: nn.Module, deterministic: bool, generating: bool) -> Array:
  """`x + FFN(norm(x))`, the FFN a Switch layer where the layout says so.
  Called inside a layer's compact method, so the modules belong to it."""
  h = RMSNorm(config.layer_norm_epsilon, activation_dtype(config), name="pre_mlp_layer_norm")(x)
  if config.is_sparse(layer):
    h = SwitchLayer(config, config.stack_router(decoder), causal=decoder, name="mlp")(
        h, valid, deterministic=deterministic, generating=generating)
  else:
    h = MlpBlock(config, name="mlp")(h, deterministic=deterministic)
  return x + drop(h, deterministic=deterministic)


class EncoderLayer(nn.Module):
  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x, bias, mask, valid, *, deterministic, generating=False):
    cfg = self.config
    dtype = activation_dtype(cfg)
    drop = nn.Dropout(cfg.dropout_rate)
    h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_attention_layer_norm")(x)
    h = MultiHeadAttention(cfg, name="attention")(h, h, bias, mask, deterministic=deterministic)
    x = x + drop(h, deterministic=deterministic)
    return _ffn_sublayer(cfg, self.layer, False, x, valid, drop, deterministic, generating)


class DecoderLayer(nn.Module):
  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x, encoded, bias, self_mask, cross_mask, valid, *, deterministic, decode):
    cfg = self.config
    dtype = activation_dtype(cfg)
    drop = nn.Dropout(cfg.dropout_rate)
    h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_self_attention_layer_norm")(x)
    h = MultiHeadAttention(cfg, name="self_attention")(
        h, h, bias, self_mask, deterministic=deterministic, decode=decode)
    x = x + drop(h, deterministic=deterministic)
    h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_cross_attention_layer_norm")(x)
    h = MultiHeadAttention(cfg, name="encoder_decoder_attention")(
        h, encoded, None, cross_mask, deterministic=deterministic)
    x = x + drop(h, deterministic=deterministic)
    # Every decode=True call is generation (or the call that sizes the cache).
    return _ffn_sublayer(cfg, self.layer, True, x, valid, drop, deterministic, decode)


class Encoder(nn.Module):
  config: ModelConfig
  embed: nn.Module

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Optional[Array] = None, *,
               deterministic: bool, generating: bool = False) -> Array:
    """<int32>[B, L] -> <dtype>[B, L, d]; token 0 is padding.

    `generating`: route as for decoding (SwitchLayer), so that each row's
    encoding is independent of the other rows.
    """
    cfg = self.config
    dtype = activation_dtype(cfg)
    valid = tokens > 0
    mask = attention_mask(valid, valid, False, segment_ids, segment_ids)
    bias = RelativePositionBias(cfg.relative_attention_num_buckets,
                                cfg.relative_attention_max_distance, cfg.num_heads,
                                bidirectional=True, dtype=dtype, name="relpos_bias")(
                                    tokens.shape[1], tokens.shape[1])
    x = nn.Dropout(cfg.dropout_rate)(self.embed(tokens), deterministic=deterministic)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, i, name=f"layers_{i}")(
          x, bias, mask, valid, deterministic=deterministic, generating=generating)
    x = RMSNorm(cfg.layer_norm_epsilon, dtype, name="encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: ModelConfig
  embed: nn.Module

  @nn.compact
  def __call__(self, encoded: Array, encoder_valid: Array, decoder_input_tokens: Array,
               decoder_valid: Optional[Array] = None, encoder_segment_ids=None,
               decoder_segment_ids=None, *, deterministic: bool, decode: bool = False) -> Array:
    """Decoder inputs <int32>[B, Ld] -> <float32>[B, Ld, vocab] logits.

    `decoder_valid` marks real target positions for the router (the inputs
    start with token 0, so they cannot say); None treats all as real.
    """
    cfg = self.config
    dtype = activation_dtype(cfg)
    batch, length = decoder_input_tokens.shape
    if decoder_valid is None:
      decoder_valid = jnp.ones((batch, length), bool)
    relpos = RelativePositionBias(cfg.relative_attention_num_buckets,
                                  cfg.relative_attention_max_distance, cfg.num_heads,
                                  bidirectional=False, dtype=dtype, name="relpos_bias")
    if decode and self.has_variable("cache", "step"):
      # One token per call: the bias row of the current step against the
      # whole cache; the attention caches mask the slots not yet written.
      step = self.variable("cache", "step", lambda: jnp.array(0, jnp.int32))
      max_length = self.variables["cache"]["layers_0"]["self_attention"]["cached_key"].shape[1]
      bias = relpos(1, max_length, step.value)
      self_mask = None
      step.value = step.value + 1
    elif decode:  # the call that sizes the caches: a full-length causal pass
      self.variable("cache", "step", lambda: jnp.array(0, jnp.int32))
      bias = relpos(length, length)
      self_mask = attention_mask(decoder_valid, decoder_valid, causal=True)
    else:
      bias = relpos(length, length)
      self_mask = attention_mask(decoder_valid, decoder_valid, True,
                                 decoder_segment_ids, decoder_segment_ids)
    cross_mask = attention_mask(jnp.ones((batch, length), bool), encoder_valid, False,
                                decoder_segment_ids, encoder_segment_ids)
    x = nn.Dropout(cfg.dropout_rate)(self.embed(decoder_input_tokens), deterministic=deterministic)
    for i in range(cfg.num_decoder_layers):
      x = DecoderLayer(cfg, i, name=f"layers_{i}")(
          x, encoded, bias, self_mask, cross_mask, decoder_valid,
          deterministic=deterministic, decode=decode)
    x = RMSNorm(cfg.layer_norm_epsilon, dtype, name="decoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    if cfg.tie_embeddings:
      return self.embed.attend(x.astype(jnp.float32) * cfg.d_model ** -0.5)
    kernel = param(self, "logits_dense", kernel_init(cfg.init_scale, in_axis=0, out_axis=1),
                   (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
    return vocab_logits(x, kernel)


class EncoderDecoder(nn.Module):
  """T5 / Switch Transformer encoder-decoder.

  Attributes:
    config: the model config.
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, activation_dtype(cfg))
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None, *,
             deterministic: bool = True, generating: bool = False) -> Array:
    return self.encoder(encoder_input_tokens, encoder_segment_ids, deterministic=deterministic,
                        generating=generating)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Optional[Array] = None, encoder_segment_ids=None,
             decoder_segment_ids=None, *, deterministic: bool = True,
             decode: bool = False) -> Array:
    decoder_valid = None if decoder_target_tokens is None else decoder_target_tokens > 0
    return self.decoder(encoded, encoder_input_tokens > 0, decoder_input_tokens, decoder_valid,
                        encoder_segment_ids, decoder_segment_ids,
                        deterministic=deterministic, decode=decode)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None, *,
               deterministic: bool = True) -> Array:
    """Teacher-forced logits <float32>[B, Ld, vocab].

    Args:
      encoder_input_tokens: <int32>[B, Le], 0 = padding.
      decoder_input_tokens: <int32>[B, Ld], targets shifted right (start 0).
      decoder_target_tokens: <int32>[B, Ld]; only its padding (0) is used,
        to keep padding out of the routers.
      encoder_segment_ids, decoder_segment_ids: <int32>[B, L] packing ids.
      deterministic: False in training (dropout, jitter, train capacity).
    """
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, deterministic=deterministic)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, deterministic=deterministic)
