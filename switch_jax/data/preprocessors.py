"""Unsupervised pretraining objectives as seqio preprocessors.

T5's recipe, written for seqio (which ships none of it): take one random
chunk of each tokenized document, concatenate 128 documents without
separators, cut the stream into fixed-size pieces, then corrupt each piece:

- `span_corruption`: 15% of tokens in spans of mean length 3, each span a
  sentinel in the inputs; the targets list the spans after their sentinels.
  Pieces are 568 tokens so inputs are exactly 512 and targets 114.
- `iid_denoising`: the same with independently chosen noise tokens.
- `prefix_lm`: the encoder reads a random prefix, the decoder writes the rest.

`objective_preprocessors(...)` gives a task's whole preprocessor chain.
Every random choice is stateless and seeded by seqio, so a pipeline under a
fixed seed is reproducible.

The recipe follows T5's published code (Apache-2.0) in
`t5.data.preprocessors`: `select_random_chunk`, `reduce_concat_tokens`,
`split_tokens`, `denoise`, `span_corruption`, `iid_denoising` and
`prefix_lm`; the noise masks are in `noise.py`.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import seqio
import tensorflow as tf

from switch_jax.data import noise

# Longest document slice kept (tokens); the rest of such a document is unused.
MAX_CHUNK_TOKENS = 65536
# Documents concatenated before splitting, so short documents fill pieces.
CONCAT_BATCH_SIZE = 128
OBJECTIVES = ("span_corruption", "iid_denoising", "prefix_lm")


@seqio.map_over_dataset
def sanitize_text(x: Mapping[str, tf.Tensor], key: str = "text") -> dict:
  """Replaces invalid UTF-8 with U+FFFD and strips surrounding whitespace.

  Bad bytes in one record must not stop the stream, and the pretokenized
  strings reach Python-side metrics, which need valid UTF-8.
  """
  x = dict(x)
  text = tf.strings.unicode_transcode(
      x[key], "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
  x[key] = tf.strings.strip(text)
  return x


def select_random_chunk(dataset: tf.data.Dataset, max_length: int = MAX_CHUNK_TOKENS,
                        feature_key: str = "targets") -> tf.data.Dataset:
  """Keeps one random `max_length`-token slice of each non-empty document.

  Drops every other feature and documents with no tokens (an empty line
  tokenizes to nothing).
  """
  dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)

  @seqio.map_over_dataset(num_seeds=1)
  def _chunk(x, seed):
    tokens = x[feature_key]
    num_tokens = tf.size(tokens)
    num_chunks = (num_tokens + max_length - 1) // max_length
    start = max_length * tf.random.stateless_uniform(
        [], seed=seed, minval=0, maxval=num_chunks, dtype=tf.int32)
    return {feature_key: tokens[start:tf.minimum(start + max_length, num_tokens)]}

  return _chunk(dataset)


def reduce_concat_tokens(dataset: tf.data.Dataset, feature_key: str = "targets",
                         batch_size: int = CONCAT_BATCH_SIZE) -> tf.data.Dataset:
  """Concatenates `batch_size` consecutive documents into one token stream."""
  dataset = dataset.map(lambda x: {feature_key: x[feature_key]})
  dataset = dataset.padded_batch(batch_size, padded_shapes={feature_key: [-1]})

  def _flatten(x):
    tokens = tf.reshape(x[feature_key], [-1])
    # Pad id 0 never occurs in real text, so it marks padding only.
    return {feature_key: tf.boolean_mask(tokens, tokens != 0)}

  return dataset.map(_flatten, num_parallel_calls=tf.data.AUTOTUNE)


def split_tokens(dataset: tf.data.Dataset, max_tokens_per_segment: int,
                 feature_key: str = "targets") -> tf.data.Dataset:
  """Cuts each example into pieces of `max_tokens_per_segment` (last one shorter)."""
  def _to_pieces(x):
    tokens = x[feature_key]
    num_tokens = tf.size(tokens)
    num_pieces = (num_tokens + max_tokens_per_segment - 1) // max_tokens_per_segment
    padded = tf.pad(tokens, [[0, num_pieces * max_tokens_per_segment - num_tokens]])
    pieces = tf.reshape(padded, [num_pieces, max_tokens_per_segment])
    lengths = tf.minimum(max_tokens_per_segment,
                         num_tokens - max_tokens_per_segment * tf.range(num_pieces))
    return {feature_key: pieces, "_length": lengths}

  dataset = dataset.map(_to_pieces, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
  return dataset.map(lambda x: {feature_key: x[feature_key][:x["_length"]]},
                     num_parallel_calls=tf.data.AUTOTUNE)


def denoise(dataset: tf.data.Dataset, vocabulary: seqio.Vocabulary, noise_density: float,
            noise_mask_fn: Callable, inputs_fn: Callable, targets_fn: Callable
            ) -> tf.data.Dataset:
  """Builds {inputs, targets} from each example's `targets` tokens and a noise mask."""
  vocab_size = vocabulary.vocab_size

  @seqio.map_over_dataset(num_seeds=2)
  def _corrupt(x, seeds):
    tokens = x["targets"]
    mask = noise_mask_fn(tf.size(tokens), noise_density, seeds)
    return {"inputs": inputs_fn(tokens, mask, vocab_size),
            "targets": targets_fn(tokens, mask, vocab_size)}

  return _corrupt(dataset)


def _chunked_stream(dataset, piece_length):
  dataset = select_random_chunk(dataset)
  dataset = reduce_concat_tokens(dataset)
  return split_tokens(dataset, piece_length)


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0
                    ) -> tf.data.Dataset:
  """T5's pretraining objective (inputs 512 -> targets 114 at the defaults)."""
  piece_length, _ = noise.span_corruption_lengths(
      sequence_length["inputs"], noise_density, mean_noise_span_length)
  dataset = _chunked_stream(dataset, piece_length)
  return denoise(
      dataset, output_features["targets"].vocabulary, noise_density,
      functools.partial(noise.random_spans_noise_mask,
                        mean_noise_span_length=mean_noise_span_length),
      noise.noise_span_to_unique_sentinel, noise.nonnoise_span_to_unique_sentinel)


def iid_denoising(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                  output_features: Mapping[str, seqio.Feature],
                  noise_density: float = 0.15) -> tf.data.Dataset:
  """Independently chosen noise tokens; adjacent ones share a sentinel.

  Pieces fill the inputs (minus EOS); the targets need about
  `2 * noise_density` of that, so use targets >= 0.3 * inputs at 0.15.
  """
  dataset = _chunked_stream(dataset, sequence_length["inputs"] - 1)
  return denoise(dataset, output_features["targets"].vocabulary, noise_density,
                 noise.iid_noise_mask, noise.noise_span_to_unique_sentinel,
                 noise.nonnoise_span_to_unique_sentinel)


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature],
              noise_density: float = 0.5) -> tf.data.Dataset:
  """Inputs are a random prefix of each piece, targets the continuation.

  Pieces fill the inputs (minus EOS); use targets as long as inputs.
  """
  dataset = _chunked_stream(dataset, sequence_length["inputs"] - 1)
  return denoise(dataset, output_features["targets"].vocabulary, noise_density,
                 noise.random_prefix_noise_mask, noise.drop_noise_tokens,
                 noise.drop_nonnoise_tokens)


_OBJECTIVE_FNS = {"span_corruption": span_corruption, "iid_denoising": iid_denoising,
                  "prefix_lm": prefix_lm}


def objective_preprocessors(objective: str = "span_corruption", text_key: str = "text"
                            ) -> list:
  """A pretraining task's full chain, from `{text_key: string}` examples.

  sanitize -> rekey to `targets` -> tokenize -> (cache point) -> objective
  -> trim and append EOS.
  """
  if objective not in _OBJECTIVE_FNS:
    raise ValueError(f"unknown objective {objective!r}; known: {OBJECTIVES}")
  return [
      functools.partial(sanitize_text, key=text_key),
      functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
      _OBJECTIVE_FNS[objective],
      seqio.preprocessors.append_eos_after_trim,
  ]
