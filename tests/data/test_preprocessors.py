"""Span corruption, iid denoising and prefix LM: exact outputs and statistics.

The strongest check is reconstruction: merging each example's inputs and
targets back (sentinel k in the inputs <- the tokens after sentinel k in the
targets) must give back the token stream that went in, so no token is lost,
duplicated or trimmed, over many examples and documents of every size.
"""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from switch_jax.data import noise, preprocessors

VOCAB = seqio.ByteVocabulary(extra_ids=100)  # ids: 0 pad, 1 eos, 2 unk, 3..258 bytes
V = VOCAB.vocab_size  # 359; sentinel k is V - 1 - k
FEATURES = {"inputs": seqio.Feature(VOCAB, add_eos=True, required=False),
            "targets": seqio.Feature(VOCAB, add_eos=True)}


def _documents(num_docs=300, seed=0):
  """Token documents of 1..400 tokens (ids 3..258), deterministic."""
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 259, size=rng.integers(1, 400)).astype(np.int32)
          for _ in range(num_docs)]


def _dataset(docs):
  return tf.data.Dataset.from_generator(
      lambda: ({"targets": d} for d in docs),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)})


def _run(preprocessor, docs, lengths, seed=0):
  with seqio.utils.map_seed_manager(seed):
    ds = preprocessor(_dataset(docs), sequence_length=lengths, output_features=FEATURES)
  ds = seqio.preprocessors.append_eos_after_trim(ds, FEATURES, lengths)
  return [{k: v.tolist() for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def _is_sentinel(token):
  return token >= V - 100


def _merge_span_corruption(inputs, targets):
  """Original tokens of one span-corruption example (EOS stripped)."""
  assert inputs[-1] == 1 and targets[-1] == 1
  spans, current = {}, None
  for token in targets[:-1]:
    if _is_sentinel(token):
      current = token
      spans[current] = []
    else:
      spans[current].append(token)
  merged = []
  for token in inputs[:-1]:
    merged += spans[token] if _is_sentinel(token) else [token]
  return merged


def test_targets_length_for_512_inputs_is_114():
  assert noise.span_corruption_lengths(512) == (568, 114)
  # The chosen raw length is the largest whose inputs still fit.
  for inputs_length in (32, 64, 100, 512, 1024):
    raw, _ = noise.span_corruption_lengths(inputs_length)
    fits = lambda n: n - round(0.15 * n) + round(round(0.15 * n) / 3) + 1
    assert fits(raw) <= inputs_length < fits(raw + 1)
  assert noise.span_corruption_lengths(64) == (70, 14)


def test_random_spans_noise_mask_statistics():
  span_lengths, densities = [], []
  for seed in range(100):
    mask = noise.random_spans_noise_mask(
        568, 0.15, seeds=[[seed, 1], [seed, 2]]).numpy()
    assert mask.sum() == 85 and not mask[0]  # exact count; starts with a kept span
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]]))
    assert len(starts) == 28
    span_lengths += list(ends - starts + 1)
  for length in range(100, 1000, 37):
    mask = noise.random_spans_noise_mask(length, 0.15, seeds=[[length, 1], [length, 2]])
    densities.append(float(np.mean(mask.numpy())))
  assert np.mean(span_lengths) == pytest.approx(85 / 28)
  assert min(span_lengths) == 1 and max(span_lengths) >= 8  # random, not fixed, spans
  assert np.mean(densities) == pytest.approx(0.15, abs=0.002)


def test_sentinels_count_down_from_the_top_id_in_order():
  tokens = tf.constant(list(range(10, 20)), tf.int32)
  mask = tf.constant([0, 0, 1, 1, 0, 0, 0, 1, 0, 0]) > 0
  inputs = noise.noise_span_to_unique_sentinel(tokens, mask, V).numpy().tolist()
  targets = noise.nonnoise_span_to_unique_sentinel(tokens, mask, V).numpy().tolist()
  assert inputs == [10, 11, V - 1, 14, 15, 16, V - 2, 18, 19]
  assert targets == [V - 1, 12, 13, V - 2, 17, V - 3]


def test_span_corruption_fills_512_and_114_and_loses_nothing():
  docs = _documents(300)
  examples = _run(preprocessors.span_corruption, docs, {"inputs": 512, "targets": 114})
  # Each batch of 128 concatenated documents ends in one shorter piece.
  full = [ex for ex in examples if len(ex["inputs"]) == 512]
  assert len(examples) - len(full) == 3  # ceil(300 / 128) batches
  assert {len(ex["targets"]) for ex in full} == {114}
  merged = [t for ex in examples for t in _merge_span_corruption(ex["inputs"], ex["targets"])]
  assert merged == np.concatenate(docs).tolist()
  # Measured statistics: every full piece hides 85 of 568 tokens in 28 spans.
  sentinels = [sum(map(_is_sentinel, ex["inputs"])) for ex in full]
  noise_tokens = [len(ex["targets"]) - 1 - s for ex, s in zip(full, sentinels)]
  assert set(sentinels) == {28}
  assert np.sum(noise_tokens) / (568 * len(full)) == pytest.approx(85 / 568)
  first = full[0]["inputs"]
  assert [t for t in first if _is_sentinel(t)] == list(range(V - 1, V - 29, -1))


def test_span_corruption_small_lengths_never_trim_targets():
  docs = _documents(200, seed=1)
  examples = _run(preprocessors.span_corruption, docs, {"inputs": 64, "targets": 14})
  merged = [t for ex in examples for t in _merge_span_corruption(ex["inputs"], ex["targets"])]
  assert merged == np.concatenate(docs).tolist()
  assert max(len(ex["targets"]) for ex in examples) == 14


def test_span_corruption_is_deterministic_under_a_seed():
  docs = _documents(150)
  lengths = {"inputs": 128, "targets": 32}
  a = _run(preprocessors.span_corruption, docs, lengths, seed=7)
  b = _run(preprocessors.span_corruption, docs, lengths, seed=7)
  c = _run(preprocessors.span_corruption, docs, lengths, seed=8)
  assert a == b
  assert [ex["inputs"] for ex in a] != [ex["inputs"] for ex in c]


def test_iid_denoising_density_and_reconstruction():
  docs = _documents(200)
  examples = _run(preprocessors.iid_denoising, docs, {"inputs": 128, "targets": 64})
  merged = [t for ex in examples for t in _merge_span_corruption(ex["inputs"], ex["targets"])]
  assert merged == np.concatenate(docs).tolist()
  noise_tokens = sum(len(ex["targets"]) - 1 - sum(map(_is_sentinel, ex["targets"]))
                     for ex in examples)
  assert noise_tokens / len(merged) == pytest.approx(0.15, abs=0.015)


def test_prefix_lm_splits_each_piece_at_a_random_point():
  docs = _documents(200)
  examples = _run(preprocessors.prefix_lm, docs, {"inputs": 128, "targets": 128})
  merged = [t for ex in examples for t in ex["inputs"][:-1] + ex["targets"][:-1]]
  assert merged == np.concatenate(docs).tolist()
  full = [ex for ex in examples if len(ex["inputs"]) + len(ex["targets"]) == 127 + 2]
  assert len(examples) - len(full) == 2  # the end of each batch of 128 documents
  target_share = np.mean([(len(ex["targets"]) - 1) / 127 for ex in full])
  assert target_share == pytest.approx(0.5, abs=0.06)
  assert min(len(ex["targets"]) for ex in full) >= 2  # at least one token to predict


def test_select_random_chunk_keeps_one_aligned_slice_and_drops_empty_documents():
  doc = np.arange(3, 28, dtype=np.int32)  # 25 tokens -> slices [0:10], [10:20], [20:25]
  docs = [doc, np.zeros([0], np.int32)] * 20
  with seqio.utils.map_seed_manager(3):
    ds = preprocessors.select_random_chunk(_dataset(docs), max_length=10)
  chunks = [x["targets"].tolist() for x in ds.as_numpy_iterator()]
  assert len(chunks) == 20
  starts = {c[0] - 3 for c in chunks}
  assert starts <= {0, 10, 20} and len(starts) >= 2
  assert all(c == list(range(3 + s, 3 + min(s + 10, 25))) for c in chunks for s in [c[0] - 3])


@pytest.fixture(scope="module")
def bad_records_task():
  texts = [b"alpha doc", b"", b"   ", b"bad \xff\xfe bytes", b"x" * 5000, b"omega end"]
  name = "test_data_bad_records"
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
              {"text": texts}), splits=["train"]),
      preprocessors=preprocessors.objective_preprocessors("span_corruption"),
      output_features=FEATURES)
  yield seqio.get_mixture_or_task(name)
  seqio.TaskRegistry.remove(name)


def test_bad_records_are_cleaned_not_fatal(bad_records_task):
  ds = bad_records_task.get_dataset({"inputs": 64, "targets": 14}, shuffle=False, seed=0,
                                    try_in_mem_cache=False)
  examples = [{k: v.tolist() for k, v in ex.items()} for ex in ds.as_numpy_iterator()]
  merged = [t for ex in examples for t in _merge_span_corruption(ex["inputs"], ex["targets"])]
  # Empty records vanish, bad bytes become U+FFFD, the 5000-token document is
  # cut into pieces, and the document after it still arrives.
  expected = "alpha doc" + "bad \ufffd\ufffd bytes" + "x" * 5000 + "omega end"
  assert merged == [b + 3 for b in expected.encode("utf-8")]
  assert len(examples) == int(np.ceil(len(merged) / 70))
