"""Decoding: greedy and beam search against the teacher-forced model.

The references are plain and slow: greedy re-runs the full teacher-forced
model on the growing prefix, and the beam search reference scores every
complete hypothesis of a tiny vocabulary. The random weights are large
(gain 10) so that outputs depend on the input and the prefix, and the
output norm is sharpened so that greedy and beam search disagree somewhere;
tests assert both. Every function is jitted once per config (compiling is
most of this file's time).
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_jax.evaluation import decoding
from switch_jax.config import get_config
from switch_jax.errors import ConfigError
from switch_jax.model.encoder_decoder import EncoderDecoder

EOS = 1
BATCH, ENCODER_LENGTH = 6, 8
# (config name, vocab size, dtype, decode length, weight seed). tiny_switch
# has a dense FFN in layer 0 and a Switch FFN in layer 1.
SWITCH = ("tiny_switch", 128, "float32", 6, 0)
SWITCH_BF16 = ("tiny_switch", 128, "bfloat16", 6, 0)
# Vocabulary 8 and length 3: few enough hypotheses to enumerate. Seed 2
# makes greedy end one sequence with EOS while the others go on.
SMALL_DENSE = ("tiny_dense", 8, "float32", 3, 2)


def _ids(setup):
  return "-".join(map(str, setup))


def _random_params(model, enc, seed=0, gain=10.0, sharpen=3.0):
  """Normal weights, std sqrt(gain / fan_in); the model's own init is slow to compile."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), enc, enc)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if len(leaf.shape) == 1:  # norm scales; the final one sets the logits' scale
      return np.full(leaf.shape, sharpen if "decoder_norm" in name else 1.0, np.float32)
    fan_in = np.prod(leaf.shape) / leaf.shape[-1]
    std = 1.0 if "embedding" in name else np.sqrt(gain / fan_in)
    return (rng.standard_normal(leaf.shape) * std).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes["params"]))


@functools.lru_cache(maxsize=None)
def _setup(name, vocab_size, dtype, length, seed):
  # Teacher forcing routes a whole sequence per group but decoding one token
  # per group; a capacity of at least the sequence length drops no token in
  # either, so both compute the same function.
  config = get_config(name, vocab_size=vocab_size, dtype=dtype, min_expert_capacity=16)
  model = EncoderDecoder(config)
  enc = jax.random.randint(jax.random.PRNGKey(1), (BATCH, ENCODER_LENGTH), 2, vocab_size)
  enc = enc.at[1, 5:].set(0)  # one padded example
  teacher_forced = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))
  return model, _random_params(model, enc, seed), enc, length, teacher_forced


def _shift_right(tokens):
  return np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)


def _naive_greedy(setup):
  """Argmax of the teacher-forced model on the prefix, one step at a time.

  The prefix is right-padded to the full length so that one compiled
  function serves every step; the decoder is causal, so padding after the
  prefix cannot change its last logits.
  """
  model, params, enc, length, teacher_forced = setup
  tokens = np.zeros((len(enc), length), np.int32)
  finished = np.zeros(len(enc), bool)
  for step in range(length):
    logits = np.asarray(teacher_forced(params, enc, _shift_right(tokens)))
    token = np.where(finished, 0, logits[:, step].argmax(-1))
    tokens[:, step] = token
    finished |= token == EOS
  return tokens


def _sequence_lengths(tokens):
  """Tokens up to and including the first EOS, else all of them."""
  is_eos = tokens == EOS
  return np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, tokens.shape[-1])


def _teacher_forced_scores(setup, tokens, alpha):
  """<int32>[B, N, L] hypotheses -> <float32>[B, N] penalized log-probabilities.

  One [B, L] call per hypothesis, to reuse the compiled function.
  """
  _, params, enc, _, teacher_forced = setup
  tokens = np.asarray(tokens)
  lengths = _sequence_lengths(tokens)
  scores = np.zeros(tokens.shape[:2], np.float32)
  for j in range(tokens.shape[1]):
    logits = teacher_forced(params, enc, _shift_right(tokens[:, j]))
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    token_lp = np.take_along_axis(log_probs, tokens[:, j, :, None], -1)[..., 0]
    in_sequence = np.arange(tokens.shape[2]) < lengths[:, j, None]
    scores[:, j] = (token_lp * in_sequence).sum(-1)
  return scores / np.asarray(decoding.length_penalty(lengths, alpha))


def _greedy(setup):
  model, params, enc, length, _ = setup
  return np.asarray(decoding.greedy_decode(model, params, enc, max_decode_length=length))


def _beam(setup, beam_size, alpha):
  model, params, enc, length, _ = setup
  tokens, scores = decoding.beam_search(model, params, enc, beam_size=beam_size, alpha=alpha,
                                        max_decode_length=length)
  return np.asarray(tokens), np.asarray(scores)


@pytest.mark.parametrize("setup", [SWITCH, SMALL_DENSE], ids=_ids)
def test_greedy_equals_teacher_forced_argmax(setup):
  setup = _setup(*setup)
  tokens = _greedy(setup)
  np.testing.assert_array_equal(tokens, _naive_greedy(setup))
  assert len(np.unique(tokens)) > 3  # the weights do not collapse onto one token


def test_greedy_bfloat16_is_teacher_forced_argmax_up_to_rounding():
  # bfloat16 rounds differently in the fused decode step than in the full
  # pass, so a near-tie may break either way: each greedy token must be
  # within rounding of the best teacher-forced logit given its own prefix.
  setup = _setup(*SWITCH_BF16)
  _, params, enc, length, teacher_forced = setup
  tokens = _greedy(setup)
  logits = np.asarray(teacher_forced(params, enc, _shift_right(tokens)))
  shortfall = logits.max(-1) - np.take_along_axis(logits, tokens[..., None], -1)[..., 0]
  before_end = np.arange(length) < _sequence_lengths(tokens)[:, None]
  assert shortfall[before_end].max() <= 0.1
  assert np.mean(shortfall[before_end] == 0) > 0.9
  assert len(np.unique(tokens)) > 3


def test_beam_size_one_is_greedy():
  # With alpha = 0 a score is a log-probability, which only falls after the
  # greedy hypothesis ends, so one beam must find exactly the greedy path.
  setup = _setup(*SMALL_DENSE)
  greedy = _greedy(setup)
  tokens, _ = _beam(setup, 1, 0.0)
  np.testing.assert_array_equal(tokens[:, 0], greedy)
  assert np.any(_sequence_lengths(greedy) < setup[3])  # EOS ended some early


def test_beam_search_finds_exhaustive_top_k():
  # At most 7 * 7 unfinished prefixes exist, so 49 beams never prune one and
  # the returned list must be the exact top 49 of all 400 complete hypotheses.
  # (Dense only: beam search touches only the attention caches, the same in
  # a Switch model, whose scores the next test checks.)
  vocab, length, beams, alpha = SMALL_DENSE[1], SMALL_DENSE[3], 49, 0.6
  setup = _setup(*SMALL_DENSE)
  tokens, scores = _beam(setup, beams, alpha)
  every = np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)
  after_eos = np.cumsum(every == EOS, axis=-1) - (every == EOS) > 0
  hypotheses = np.unique(np.where(after_eos, 0, every), axis=0)
  assert len(hypotheses) == 1 + 7 + 7 * 7 * 8
  table = _teacher_forced_scores(setup, np.broadcast_to(hypotheses, (BATCH,) + hypotheses.shape),
                                 alpha)
  order = np.argsort(-table, axis=-1)[:, :beams]
  np.testing.assert_allclose(scores, np.take_along_axis(table, order, -1), rtol=1e-4, atol=1e-4)
  # Each returned hypothesis carries its own score (robust to near-ties in order).
  index = {tuple(h): i for i, h in enumerate(hypotheses)}
  returned = np.array([[index[tuple(h)] for h in row] for row in tokens])
  np.testing.assert_allclose(np.take_along_axis(table, returned, -1), scores, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(tokens[:, 0], hypotheses[order[:, 0]])

  greedy = _naive_greedy(setup)
  greedy_scores = _teacher_forced_scores(setup, greedy[:, None], alpha)[:, 0]
  assert np.all(greedy_scores <= scores[:, 0] + 1e-4)
  assert np.any(greedy_scores < scores[:, 0] - 1e-2)  # beam search beats greedy somewhere
  _assert_padded_after_eos(tokens)


@pytest.mark.parametrize("setup", [SWITCH, SWITCH_BF16], ids=_ids)
def test_scores_are_penalized_teacher_forced_log_probs(setup):
  dtype, alpha = setup[2], 0.6
  setup = _setup(*setup)
  tokens, scores = _beam(setup, 4, alpha)
  assert tokens.shape == (BATCH, 4, setup[3]) and scores.dtype == np.float32
  tolerance = 1e-4 if dtype == "float32" else 1e-2
  np.testing.assert_allclose(scores, _teacher_forced_scores(setup, tokens, alpha),
                             atol=tolerance, rtol=tolerance)
  assert np.all(np.diff(scores, axis=-1) <= 0)  # best first
  assert all(len({tuple(h) for h in row}) == 4 for row in tokens)  # distinct
  assert np.any(tokens[:, 0] != _greedy(setup))


def _assert_padded_after_eos(tokens):
  after_eos = np.cumsum(tokens == EOS, axis=-1) - (tokens == EOS) > 0
  np.testing.assert_array_equal(np.where(after_eos, tokens, 0), 0)


def test_tokens_after_eos_are_padding():
  setup = _setup(*SMALL_DENSE)
  greedy = _greedy(setup)
  beam, _ = _beam(setup, 1, 0.0)
  for tokens in (greedy, beam):
    _assert_padded_after_eos(tokens)
    lengths = _sequence_lengths(tokens)
    assert np.any(lengths < setup[3])
    # A sequence that ended early has its EOS at its last position.
    ended = lengths < tokens.shape[-1]
    last = np.take_along_axis(tokens, (lengths - 1)[..., None], -1)[..., 0]
    np.testing.assert_array_equal(last[ended], EOS)


def test_gather_cache_reorders_beams_and_keeps_scalars():
  cache = {"cached_key": np.arange(12).reshape(6, 2), "cache_index": np.array(5, np.int32)}
  origin = np.array([[2, 2, 0], [1, 0, 0]])  # batch 2, beam 3
  out = jax.jit(decoding.gather_cache)(cache, origin)  # one compile, not one per op
  np.testing.assert_array_equal(out["cached_key"][:, 0], [4, 4, 0, 8, 6, 6])
  assert int(out["cache_index"]) == 5
  np.testing.assert_array_equal(
      jax.jit(decoding.gather_beams)(np.arange(6).reshape(2, 3), origin), [[2, 2, 0], [4, 3, 3]])


def test_length_penalty():
  np.testing.assert_allclose(decoding.length_penalty(7, 0.6), 2.0 ** 0.6, rtol=1e-6)
  assert float(decoding.length_penalty(3, 0.0)) == 1.0


def test_predict():
  setup = _setup(*SMALL_DENSE)
  model, params, enc, length, _ = setup
  batch = {"encoder_input_tokens": enc,
           "decoder_target_tokens": np.ones((BATCH, length), np.int32)}
  np.testing.assert_array_equal(decoding.predict(model, params, batch), _greedy(setup))
  beam = decoding.predict(model, params, {"encoder_input_tokens": enc}, method="beam",
                          max_decode_length=length, beam_size=49, alpha=0.6)
  np.testing.assert_array_equal(beam, _beam(setup, 49, 0.6)[0][:, 0])
  assert np.any(beam != _greedy(setup))
  with pytest.raises(ConfigError, match="greedy"):
    decoding.predict(model, params, batch, method="sample")
  with pytest.raises(ConfigError, match="max_decode_length"):
    decoding.predict(model, params, {"encoder_input_tokens": enc})


# Tight capacity (cf 1.0, at least 1 slot, every row in one group): under it
# a decode step's rows would compete for slots. NO_DROPS has the same
# weights and never drops a token, the function generation must compute.
TIGHT = dict(vocab_size=128, group_size=8192, eval_capacity_factor=1.0, min_expert_capacity=1)
NO_DROPS = dict(vocab_size=128, group_size=8192, expert_capacity=10 ** 6)
IN_BATCH, ALONE_ROW = 32, 29


@functools.lru_cache(maxsize=None)
def _capacity_setup():
  """A batch of 32 (rows 3 and 17 all padding) and the same params under
  TIGHT and NO_DROPS configs."""
  tight = EncoderDecoder(get_config("tiny_switch", **TIGHT))
  no_drops = EncoderDecoder(get_config("tiny_switch", **NO_DROPS))
  enc = np.array(jax.random.randint(jax.random.PRNGKey(5), (IN_BATCH, ENCODER_LENGTH), 2, 128))
  enc[[3, 17]] = 0
  enc[ALONE_ROW, 6:] = 0
  params = _random_params(tight, enc, seed=0)
  teacher_forced = jax.jit(lambda p, e, d: no_drops.apply({"params": p}, e, d))
  return tight, params, enc, teacher_forced


def test_decoding_a_sequence_alone_or_in_any_batch_gives_the_same_output():
  model, params, enc, teacher_forced = _capacity_setup()
  length = 5
  alone = enc[ALONE_ROW:ALONE_ROW + 1]
  greedy_batch = np.asarray(decoding.greedy_decode(model, params, enc, max_decode_length=length))
  greedy_alone = np.asarray(decoding.greedy_decode(model, params, alone, max_decode_length=length))
  np.testing.assert_array_equal(greedy_batch[ALONE_ROW], greedy_alone[0])
  np.testing.assert_array_equal(greedy_batch[[3, 17]], 0)  # padding rows are never decoded
  # Generation applies no capacity: greedy is the argmax of the model that drops nothing.
  setup = (None, params, enc, length, teacher_forced)
  real = np.any(enc > 0, axis=1)
  np.testing.assert_array_equal(greedy_batch[real], _naive_greedy(setup)[real])

  beams = 3
  tokens, scores = decoding.beam_search(model, params, enc, beam_size=beams, alpha=0.6,
                                        max_decode_length=length)
  tokens_alone, scores_alone = decoding.beam_search(model, params, alone, beam_size=beams,
                                                    alpha=0.6, max_decode_length=length)
  np.testing.assert_array_equal(tokens[ALONE_ROW], tokens_alone[0])
  # Equal up to float summation order, which differs with the batch shape.
  np.testing.assert_allclose(scores[ALONE_ROW], scores_alone[0], rtol=1e-4, atol=1e-4)
  # Every beam attends to its own input's one encoding: its score is the
  # drop-free teacher-forced log-probability of its tokens.
  np.testing.assert_allclose(np.asarray(scores)[real],
                             _teacher_forced_scores(setup, tokens, 0.6)[real], atol=1e-4)


def test_rows_that_are_not_live_are_not_routed():
  # A decode step's router statistics count only the live rows: one live
  # row gives one expert all of the step's picks.
  model, params, enc, _ = _capacity_setup()
  encoded = decoding.encode(model, params, enc)
  cache = decoding.init_cache(model, params, encoded, enc, 2)
  live = np.zeros(IN_BATCH, np.int32)
  live[ALONE_ROW] = 1

  @jax.jit
  def step(live):
    _, state = model.apply({"params": params, "cache": cache}, encoded, enc,
                           np.zeros((IN_BATCH, 1), np.int32), live[:, None], decode=True,
                           mutable=["cache", "moe"], method=model.decode)
    return state["moe"]["decoder"]["layers_1"]["mlp"]["expert_fraction"][0]

  fraction = np.asarray(step(live))
  assert sorted(fraction.tolist())[-1] == 1.0 and np.sum(fraction) == 1.0
  assert np.max(np.asarray(step(np.ones_like(live)))) < 1.0  # all 32 rows spread over experts
