"""Autoregressive decoding over the decoder's key/value cache: greedy and beam search.

Both run the encoder once, then the decoder one token per step inside a
`jax.lax.while_loop` that stops when every sequence is done. A step feeds
the previous token (the decoder start token, 0, first) and reads the logits
of the next one. Token 1 is EOS; positions after it hold padding (0).

A sequence's output never depends on the rest of its batch. Switch layers
route with `generating=True` (switch_layer.py): a decode step's routing
group is one token of every sequence, so under a capacity of
`cf * B / E` slots the B rows, all fed the same start token at step 0,
would compete for one expert's slots in row order, and the rows after the
first C would lose their expert output. Token-choice routers therefore
apply no capacity while generating (every token reaches its experts, as in
the dropless router) and expert choice routes each encoder sequence as its
own group. Rows that are finished, padding (all-zero inputs) or empty beams
are also kept out of the routers' statistics.

Beam search keeps two sets per example, GNMT / T5 style:
  alive: the `beam_size` best unfinished prefixes by log-probability, each
    with its own slice of the cache;
  finished: the `beam_size` best complete hypotheses by length-penalized
    score `log p / ((5 + length) / 6) ** alpha`.
A hypothesis is complete when it emits EOS (its length counts the EOS) or
when it reaches `max_decode_length` tokens.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from switch_jax.errors import ConfigError

Array = jax.Array
PyTree = Any

DECODER_START_ID = 0
PAD_ID = 0


def length_penalty(length: Array | int, alpha: float) -> Array:
  """The GNMT / T5 length normalizer `((5 + length) / 6) ** alpha` (float32)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def expand_beams(x: Array, beam_size: int) -> Array:
  """<any>[B, ...] -> [B * beam_size, ...], each row repeated beam_size times."""
  return jnp.repeat(x, beam_size, axis=0)


def gather_beams(x: Array, origin: Array) -> Array:
  """<any>[B, K, ...] -> [B, K', ...]: row `origin[b, j]` of example b."""
  return x[jnp.arange(x.shape[0])[:, None], origin]


def gather_cache(cache: PyTree, origin: Array) -> PyTree:
  """Reorders a decoding cache whose batch axis is flattened beams.

  Args:
    cache: leaves <any>[B * K, ...] (keys, values) or scalars (cache_index,
      step), which all beams share since every beam is at the same step.
    origin: <int32>[B, K'] the beam of example b that new beam j continues.

  Returns:
    The cache with leaves [B * K', ...]; scalars unchanged.
  """
  batch = origin.shape[0]

  def gather(leaf):
    if leaf.ndim == 0:
      return leaf
    beams = leaf.shape[0] // batch
    flat = (jnp.arange(batch)[:, None] * beams + origin).reshape(-1)
    return leaf[flat]

  return jax.tree.map(gather, cache)


def init_cache(model: nn.Module, params: PyTree, encoded: Array, encoder_input_tokens: Array,
               max_decode_length: int) -> PyTree:
  """An empty cache for `max_decode_length` steps of the batch of `encoded`.

  The decoder sizes its cache from a full-length call; tracing that call
  abstractly gives the shapes without running the full-length decoder, and
  an empty cache is all zeros (indices and step included).
  """
  dummy = jnp.zeros((encoded.shape[0], max_decode_length), jnp.int32)
  _, shapes = jax.eval_shape(
      functools.partial(model.apply, decode=True, mutable=["cache"], method=model.decode),
      {"params": params}, encoded, encoder_input_tokens, dummy)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def decode_step(model: nn.Module, params: PyTree, cache: PyTree, encoded: Array,
                encoder_input_tokens: Array, tokens: Array,
                live: Optional[Array] = None) -> tuple[Array, PyTree]:
  """One decoder step: <int32>[N] previous tokens -> (<float32>[N, V] logits, cache).

  `live` <bool>[N] marks the rows still decoding; the others are padding to
  the routers (their logits are not used).
  """
  # The decoder reads only the padding (0) of its target tokens, as a mask.
  targets = None if live is None else live.astype(jnp.int32)[:, None]
  logits, mutated = model.apply({"params": params, "cache": cache}, encoded,
                                encoder_input_tokens, tokens[:, None], targets, decode=True,
                                mutable=["cache"], method=model.decode)
  return logits[:, 0].astype(jnp.float32), mutated["cache"]


def encode(model: nn.Module, params: PyTree, encoder_input_tokens: Array) -> Array:
  """<int32>[B, Le] -> <dtype>[B, Le, d], each row routed as if alone."""
  return model.apply({"params": params}, encoder_input_tokens, generating=True,
                     method=model.encode)


def _padding_rows(encoder_input_tokens: Array) -> Array:
  """<bool>[B] rows with no input token: batch padding, never decoded."""
  return ~jnp.any(encoder_input_tokens > 0, axis=1)


def _previous_tokens(tokens: Array, step: Array) -> Array:
  """<int32>[..., L] decoded so far -> [...] the input of `step` (start token first)."""
  last = jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(step - 1, 0), axis=-1,
                                      keepdims=False)
  return jnp.where(step > 0, last, DECODER_START_ID)


class _GreedyState(NamedTuple):
  step: Array      # <int32>[] position being decoded
  cache: PyTree
  tokens: Array    # <int32>[B, L]
  finished: Array  # <bool>[B] emitted EOS


def greedy_decode(model: nn.Module, params: PyTree, encoder_input_tokens: Array, *,
                  max_decode_length: int, eos_id: int = 1) -> Array:
  """Argmax decoding.

  Args:
    model: an `EncoderDecoder`.
    params: its parameters.
    encoder_input_tokens: <int32>[B, Le], 0 = padding.
    max_decode_length: L, the most tokens to generate.
    eos_id: the token that ends a sequence.

  Returns:
    <int32>[B, L] tokens, 0 after each sequence's EOS.
  """
  return _greedy_decode(model, params, encoder_input_tokens, max_decode_length, eos_id)


# Static arguments are positional so that one compilation serves every way
# of calling the public function (jit keys on which keywords were passed).
@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _greedy_decode(model, params, encoder_input_tokens, max_decode_length, eos_id):
  batch = encoder_input_tokens.shape[0]
  encoded = encode(model, params, encoder_input_tokens)
  cache = init_cache(model, params, encoded, encoder_input_tokens, max_decode_length)

  def not_done(s: _GreedyState):
    return (s.step < max_decode_length) & ~jnp.all(s.finished)

  def advance(s: _GreedyState):
    logits, cache = decode_step(model, params, s.cache, encoded, encoder_input_tokens,
                                _previous_tokens(s.tokens, s.step), live=~s.finished)
    token = jnp.where(s.finished, PAD_ID, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, token, s.step, axis=1)
    return _GreedyState(s.step + 1, cache, tokens, s.finished | (token == eos_id))

  start = _GreedyState(jnp.array(0, jnp.int32), cache,
                       jnp.full((batch, max_decode_length), PAD_ID, jnp.int32),
                       _padding_rows(encoder_input_tokens))
  return jax.lax.while_loop(not_done, advance, start).tokens


class _BeamState(NamedTuple):
  step: Array             # <int32>[] position being decoded
  alive_tokens: Array     # <int32>[B, K, L] unfinished prefixes, best first
  alive_log_probs: Array  # <float32>[B, K] their log-probabilities (-inf: empty)
  cache: PyTree           # leaves [B * K, ...], row b * K + k is alive beam k
  finished_tokens: Array  # <int32>[B, K, L] complete hypotheses, best first
  finished_scores: Array  # <float32>[B, K] length-penalized (-inf: empty)


def beam_search(model: nn.Module, params: PyTree, encoder_input_tokens: Array, *,
                beam_size: int = 4, alpha: float = 0.6, max_decode_length: int,
                eos_id: int = 1) -> tuple[Array, Array]:
  """Beam search with the GNMT / T5 length penalty.

  Args:
    model: an `EncoderDecoder`.
    params: its parameters.
    encoder_input_tokens: <int32>[B, Le], 0 = padding.
    beam_size: K, hypotheses kept alive and returned per example.
    alpha: length penalty exponent; 0 ranks by log-probability alone.
    max_decode_length: L, the most tokens in a hypothesis.
    eos_id: the token that ends a hypothesis.

  Returns:
    tokens <int32>[B, K, L] (0 after EOS) and scores <float32>[B, K], the
    length-penalized log-probabilities, best first. A slot holds -inf when
    fewer than K hypotheses exist (a vocabulary smaller than the beam).
  """
  return _beam_search(model, params, encoder_input_tokens, jnp.float32(alpha), beam_size,
                      max_decode_length, eos_id)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _beam_search(model, params, encoder_input_tokens, alpha, beam_size, max_decode_length,
                 eos_id):
  batch, k, length = encoder_input_tokens.shape[0], beam_size, max_decode_length
  # Encode each input once; its K beams share that encoding, and a beam
  # only ever continues a beam of the same example, so it stays consistent
  # with the cache through every reordering.
  padding = _padding_rows(encoder_input_tokens)
  encoded = expand_beams(encode(model, params, encoder_input_tokens), k)
  encoder_input_tokens = expand_beams(encoder_input_tokens, k)
  cache = init_cache(model, params, encoded, encoder_input_tokens, length)

  def not_done(s: _BeamState):
    # A prefix's log-probability only falls as it grows, so its best
    # possible score uses the largest penalty any remaining length gives.
    best_penalty = jnp.maximum(length_penalty(s.step + 1, alpha), length_penalty(length, alpha))
    best_alive = s.alive_log_probs[:, 0] / best_penalty
    beaten = s.finished_scores[:, -1] >= best_alive
    return (s.step < length) & ~jnp.all(beaten)

  def advance(s: _BeamState):
    # Empty beams (-inf: the K-1 copies at step 0, padding rows) are not live.
    logits, cache = decode_step(model, params, s.cache, encoded, encoder_input_tokens,
                                _previous_tokens(s.alive_tokens, s.step).reshape(-1),
                                live=jnp.isfinite(s.alive_log_probs).reshape(-1))
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits).reshape(batch, k, vocab)
    candidates = (s.alive_log_probs[..., None] + log_probs).reshape(batch, k * vocab)
    # Each beam has one EOS continuation, so among the best 2K candidates at
    # least K do not end, enough to refill the alive set.
    top_log_probs, top_index = jax.lax.top_k(candidates, min(2 * k, k * vocab))
    origin, token = top_index // vocab, top_index % vocab
    top_tokens = jax.lax.dynamic_update_index_in_dim(
        gather_beams(s.alive_tokens, origin), token, s.step, axis=2)

    ends = (token == eos_id) | (s.step == length - 1)
    end_scores = jnp.where(ends, top_log_probs / length_penalty(s.step + 1, alpha), -jnp.inf)
    finished_scores, keep = jax.lax.top_k(
        jnp.concatenate([s.finished_scores, end_scores], axis=1), k)
    finished_tokens = gather_beams(
        jnp.concatenate([s.finished_tokens, top_tokens], axis=1), keep)

    alive_log_probs, keep = jax.lax.top_k(
        jnp.where(token == eos_id, -jnp.inf, top_log_probs), k)
    return _BeamState(
        step=s.step + 1,
        alive_tokens=gather_beams(top_tokens, keep),
        alive_log_probs=alive_log_probs,
        cache=gather_cache(cache, gather_beams(origin, keep)),
        finished_tokens=finished_tokens,
        finished_scores=finished_scores)

  # Beams start identical; only the first is live so that the first step
  # does not propose the same continuation K times. Padding rows have none.
  first = jnp.array([0.0] + [-jnp.inf] * (k - 1), jnp.float32)
  start = _BeamState(
      step=jnp.array(0, jnp.int32),
      alive_tokens=jnp.full((batch, k, length), PAD_ID, jnp.int32),
      alive_log_probs=jnp.where(padding[:, None], -jnp.inf, first[None, :]),
      cache=cache,
      finished_tokens=jnp.full((batch, k, length), PAD_ID, jnp.int32),
      finished_scores=jnp.full((batch, k), -jnp.inf, jnp.float32))
  final = jax.lax.while_loop(not_done, advance, start)
  return final.finished_tokens, final.finished_scores


def predict(model: nn.Module, params: PyTree, batch: Mapping[str, Array], *,
            method: str = "greedy", max_decode_length: Optional[int] = None,
            beam_size: int = 4, alpha: float = 0.6, eos_id: int = 1) -> Array:
  """The best decoded sequence per example.

  Args:
    model: an `EncoderDecoder`.
    params: its parameters.
    batch: holds 'encoder_input_tokens' <int32>[B, Le] and, when
      `max_decode_length` is None, 'decoder_target_tokens' <int32>[B, L]
      whose length bounds the output.
    method: 'greedy' or 'beam'.
    max_decode_length: the most tokens to generate.
    beam_size, alpha: beam search settings (ignored by greedy).
    eos_id: the token that ends a sequence.

  Returns:
    <int32>[B, L] tokens, 0 after EOS.
  """
  if max_decode_length is None:
    if "decoder_target_tokens" not in batch:
      raise ConfigError("predict needs max_decode_length or a batch with "
                        "'decoder_target_tokens' to size the output")
    max_decode_length = batch["decoder_target_tokens"].shape[1]
  inputs = batch["encoder_input_tokens"]
  if method == "greedy":
    return greedy_decode(model, params, inputs, max_decode_length=max_decode_length,
                         eos_id=eos_id)
  if method == "beam":
    tokens, _ = beam_search(model, params, inputs, beam_size=beam_size, alpha=alpha,
                            max_decode_length=max_decode_length, eos_id=eos_id)
    return tokens[:, 0]
  raise ConfigError(f"decoding method must be 'greedy' or 'beam', got {method!r}")
