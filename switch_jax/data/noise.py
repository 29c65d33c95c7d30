"""Token-level noise for the unsupervised objectives: masks and sentinels.

Pure TensorFlow functions on one example, with stateless seeds, so that a
pipeline re-run under the same seed corrupts the same tokens. The dataset-level
objectives that use them (span corruption, iid denoising, prefix LM) live in
`preprocessors.py`.

Conventions (T5's): a noise mask is `<bool>[L]`, True where the token is
hidden from the encoder; sentinel k is id `vocab_size - 1 - k`, so the
vocabulary must reserve its top ids (the 100 "extra ids") for sentinels.

The algorithms follow T5's published code (Apache-2.0), function for function
in `t5.data.preprocessors`: `random_spans_helper` (our
`span_corruption_lengths`), `random_spans_noise_mask`, `iid_noise_mask`,
`random_prefix_noise_mask`, `noise_span_to_unique_sentinel`,
`nonnoise_span_to_unique_sentinel`, `drop_noise_tokens` and
`drop_nonnoise_tokens`.
"""

from __future__ import annotations

import tensorflow as tf


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """Raw tokens per example, and the targets length, for span corruption.

  Picks the largest number of raw tokens whose corrupted inputs (kept tokens,
  one sentinel per noise span, EOS) still fit in `inputs_length`, and returns
  it with the length of the matching targets (noise tokens, one sentinel per
  span, EOS). T5's 512-token inputs give 568 raw tokens and 114 targets.
  """
  def corrupted_lengths(num_tokens):
    num_noise = int(round(num_tokens * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return (num_tokens - num_noise + num_spans + 1, num_noise + num_spans + 1)

  num_tokens = inputs_length - 1
  while corrupted_lengths(num_tokens + 1)[0] <= inputs_length:
    num_tokens += 1
  return num_tokens, corrupted_lengths(num_tokens)[1]


def _random_partition(num_items, num_parts, seed):
  """Splits `num_items` into `num_parts` positive lengths, uniformly at random.

  Chooses `num_parts - 1` of the `num_items - 1` gaps between items as cuts.
  Returns `<int32>[num_parts]` summing to `num_items`.
  """
  gap_rank = tf.argsort(tf.random.stateless_uniform([num_items - 1], seed=seed))
  is_cut = tf.cast(gap_rank < num_parts - 1, tf.int32)
  part_of_item = tf.cumsum(tf.concat([[0], is_cut], axis=0))
  return tf.math.unsorted_segment_sum(tf.ones_like(part_of_item), part_of_item, num_parts)


def random_spans_noise_mask(length, noise_density, seeds, mean_noise_span_length=3.0):
  """T5's span-corruption mask: alternating kept and noise spans.

  Exactly `round(length * noise_density)` tokens are noise (at least 1, at
  most `length - 1`), in `round(num_noise / mean_noise_span_length)` spans (at
  least 1). Span lengths are random compositions, so the mean span length is
  exact per example while single spans vary. The sequence always starts with
  a kept span, so the first sentinel in the inputs is the first in the targets.

  Args:
    length: int32 scalar, number of tokens.
    noise_density: fraction of tokens to hide.
    seeds: two stateless seeds, each `<int>[2]`.
    mean_noise_span_length: average noise span length.

  Returns:
    `<bool>[length]`.
  """
  orig_length = length
  # One token cannot hold a kept span and a noise span.
  length = tf.maximum(length, 2)
  # float64 and round-half-even, exactly as `span_corruption_lengths` computes
  # in Python; in float32, 70 * 0.15 rounds up and overflows the targets.
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float64) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length),
                      tf.int32)
  num_spans = tf.maximum(num_spans, 1)
  noise_lengths = _random_partition(num_noise, num_spans, seeds[0])
  kept_lengths = _random_partition(length - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
  span_starts = tf.cumsum(span_lengths)[:-1]
  starts_span = tf.math.unsorted_segment_sum(
      tf.ones_like(span_starts), span_starts, length)
  span_index = tf.cumsum(starts_span)
  return tf.equal(span_index % 2, 1)[:orig_length]


def iid_noise_mask(length, noise_density, seeds):
  """Each token but the first is noise independently with `noise_density`.

  The first token stays kept so that, as with spans, sentinel k marks the
  same noise span in the inputs and in the targets. Returns `<bool>[length]`.
  """
  is_noise = tf.random.stateless_uniform([length], seed=seeds[0]) < noise_density
  return tf.logical_and(is_noise, tf.range(length) > 0)


def random_prefix_noise_mask(length, noise_density, seeds):
  """Noise is a suffix whose length is uniform in [1, ~2 * density * length].

  With the default density 0.5 the split point is uniform over the sequence,
  which is the prefix-LM objective: the encoder sees the prefix, the decoder
  writes the rest. Returns `<bool>[length]`.
  """
  max_noise = tf.cast(tf.round(2.0 * noise_density * tf.cast(length, tf.float64)), tf.int32)
  max_noise = tf.clip_by_value(max_noise, 1, tf.maximum(length - 1, 1))
  num_noise = tf.random.stateless_uniform(
      [], seed=seeds[0], minval=1, maxval=max_noise + 1, dtype=tf.int32)
  return tf.range(length) >= length - num_noise


def noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size):
  """Replaces each noise span by one sentinel, counting down from the top id.

  Args:
    tokens: `<int32>[L]`.
    noise_mask: `<bool>[L]`.
    vocab_size: size of the vocabulary including its extra ids.

  Returns:
    `<int32>[L']`, the kept tokens with sentinel k in place of noise span k.
  """
  prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
  first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
  later_noise = tf.logical_and(noise_mask, prev_is_noise)
  sentinel = vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))
  tokens = tf.where(first_noise, sentinel, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(later_noise))


def nonnoise_span_to_unique_sentinel(tokens, noise_mask, vocab_size):
  """The targets side of span corruption: kept spans become sentinels."""
  return noise_span_to_unique_sentinel(tokens, tf.logical_not(noise_mask), vocab_size)


def drop_noise_tokens(tokens, noise_mask, vocab_size):
  del vocab_size
  return tf.boolean_mask(tokens, tf.logical_not(noise_mask))


def drop_nonnoise_tokens(tokens, noise_mask, vocab_size):
  del vocab_size
  return tf.boolean_mask(tokens, noise_mask)
