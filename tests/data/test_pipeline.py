"""The trainer's data API: determinism, resume, host sharding, errors.

Uses the local-files tasks on small corpora written here, so the whole
stream can be decoded and every document accounted for.
"""

import dataclasses
import json
import re

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import switch_jax.tasks  # noqa: F401  registers the tasks and their gin configurables
from switch_jax.data import pipeline, sources, vocabularies
from switch_jax.errors import UserError

NUM_FILES, DOCS_PER_FILE = 4, 30
LENGTHS = {"inputs": 64, "targets": 16}
VOCAB_PATH = []  # the vocabulary trained by the corpus_dir fixture


def _doc(file_index, i):
  return f"doc {file_index * 100 + i} says the quick brown fox jumps over the lazy dog ends"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  for f in range(NUM_FILES):
    (root / f"part{f}.txt").write_text(
        "\n".join(_doc(f, i) for i in range(DOCS_PER_FILE)) + "\n", encoding="utf-8")
  (root / "one.jsonl").write_text("\n".join(
      [json.dumps({"text": _doc(9, 0)}), "{not json", json.dumps({"text": _doc(9, 1)})]))
  vocab = vocabularies.train_sentencepiece([str(root / "part0.txt")], 60,
                                           str(tmp_path_factory.mktemp("vocab")))
  gin.bind_parameter("local_vocabulary_path.path", vocab.sentencepiece_model_file)
  gin.bind_parameter("local_files.train", str(root / "part*.txt"))
  VOCAB_PATH.append(vocab.sentencepiece_model_file)
  yield root
  gin.bind_parameter("local_vocabulary_path.path", None)
  gin.bind_parameter("local_files.train", None)


@pytest.fixture()
def bound(corpus_dir):
  """Temporarily rebinds local_files parameters."""
  changed = []

  def bind(**kwargs):
    for key, value in kwargs.items():
      changed.append(key)
      gin.bind_parameter(f"local_files.{key}", value)
  yield bind
  for key in changed:
    gin.bind_parameter(f"local_files.{key}", str(corpus_dir / "part*.txt")
                       if key == "train" else None)


def _config(**kwargs):
  return pipeline.DatasetConfig(**{"mixture_or_task_name": "local_span_corruption",
                                   "task_feature_lengths": LENGTHS, "batch_size": 4,
                                   "seed": 0, **kwargs})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _documents_seen(cfg, shard_index=0, num_shards=1):
  """Doc ids in one shard's single unshuffled pass, rebuilt from its examples."""
  vocab = seqio.get_mixture_or_task(cfg.mixture_or_task_name).output_features[
      "targets"].vocabulary
  sentinel_floor = vocab.vocab_size - 100
  stream = []
  for batch in pipeline.get_eval_batches(cfg, shard_index, num_shards):
    for inputs, targets in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"]):
      spans, current = {}, None
      for t in targets[targets > 1]:
        if t >= sentinel_floor:
          current = spans.setdefault(t, [])
        else:
          current.append(t)
      for t in inputs[inputs > 1]:
        stream += spans.get(t, []) if t >= sentinel_floor else [t]
  text = vocab.decode([int(t) for t in stream])
  return [int(m) for m in re.findall(r"doc (\d+) says", text)]


def test_batches_have_the_converter_features_and_host_shapes(corpus_dir):
  batch = next(pipeline.get_batches(_config(batch_size=8), shard_index=1, num_shards=2))
  assert set(batch) == {
      "encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens",
      "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids",
      "encoder_positions", "decoder_positions"}
  assert batch["encoder_input_tokens"].shape == (4, 64)
  assert batch["decoder_target_tokens"].dtype == np.int32
  tokens, segments = batch["encoder_input_tokens"], batch["encoder_segment_ids"]
  assert np.array_equal(segments > 0, tokens > 0)  # packed rows mark their examples
  assert (batch["encoder_positions"][:, 0] == 0).all()


def test_same_seed_same_stream_other_seed_other_stream(corpus_dir):
  a = _take(pipeline.get_batches(_config(seed=1)), 3)
  b = _take(pipeline.get_batches(_config(seed=1)), 3)
  c = _take(pipeline.get_batches(_config(seed=2)), 3)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(a[0]["encoder_input_tokens"], c[0]["encoder_input_tokens"])


def test_resume_sees_exactly_the_batches_it_would_have_seen(corpus_dir):
  # 120 short documents: 12 batches cover more than one epoch of the corpus.
  fresh = _take(pipeline.get_batches(_config(seed=3)), 12)
  resumed = _take(pipeline.get_batches(_config(seed=3), start_batch=9), 3)
  for x, y in zip(fresh[9:], resumed):
    assert all(np.array_equal(x[k], y[k]) for k in x)


def test_hosts_read_disjoint_shards_that_cover_the_corpus(corpus_dir):
  everything = sorted(f * 100 + i for f in range(NUM_FILES) for i in range(DOCS_PER_FILE))
  assert sorted(_documents_seen(_config())) == everything
  for num_shards in (2, 3):  # whole files per host
    seen = [_documents_seen(_config(batch_size=6), s, num_shards) for s in range(num_shards)]
    assert sorted(sum(seen, [])) == everything
    assert all(len(s) > 0 for s in seen)


def test_fewer_files_than_hosts_shards_examples(corpus_dir, bound):
  bound(train=str(corpus_dir / "part0.txt"))
  seen = [_documents_seen(_config(), s, 2) for s in range(2)]
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) <= set(range(DOCS_PER_FILE))
  assert len(seen[0]) > 5 and len(seen[1]) > 5


def test_json_lines_skip_a_broken_line_and_continue(corpus_dir, bound):
  bound(train=str(corpus_dir / "one.jsonl"))
  assert _documents_seen(_config()) == [900, 901]


def test_eval_batches_are_unpacked_single_pass_and_padded(corpus_dir):
  cfg = _config(batch_size=8)
  batches = list(pipeline.get_eval_batches(cfg))
  one_pass = dataclasses.replace(cfg, shuffle=False, pack=False, num_epochs=1)
  num_examples = sum(1 for _ in pipeline.get_dataset(one_pass, batch=False))
  assert "encoder_segment_ids" not in batches[0]
  assert {b["encoder_input_tokens"].shape for b in batches} == {(8, 64)}
  assert len(batches) == -(-num_examples // 8)
  real = np.concatenate([b["decoder_loss_weights"].sum(axis=1) > 0 for b in batches])
  assert real.sum() == num_examples and real[:num_examples].all()
  padding = {k: v[num_examples - 8 * (len(batches) - 1):] for k, v in batches[-1].items()}
  assert all((v == 0).all() for v in padding.values())


def test_unknown_task_names_suggest_close_ones():
  with pytest.raises(UserError, match="did you mean local_span_corruption"):
    pipeline.get_dataset(_config(mixture_or_task_name="local_span_corruptoin"))


def test_bad_configs_are_user_errors(bound):
  with pytest.raises(UserError, match="does not divide"):
    pipeline.get_dataset(_config(batch_size=6), 0, 4)
  with pytest.raises(UserError, match="no split 'dev'"):
    pipeline.get_dataset(_config(split="dev"))
  # Unbound here whatever an earlier in-process command in this worker left bound.
  bound(validation=None)
  with pytest.raises(UserError, match="local_files.validation"):
    pipeline.get_dataset(_config(split="validation"))


def test_unreadable_vocabulary_is_a_user_error(corpus_dir, tmp_path):
  gin.bind_parameter("local_vocabulary_path.path", str(tmp_path / "none.model"))
  try:
    with pytest.raises(UserError, match="cannot read the SentencePiece vocabulary"):
      pipeline.get_dataset(_config())
  finally:
    gin.bind_parameter("local_vocabulary_path.path", VOCAB_PATH[-1])


def test_empty_and_non_utf8_corpora_are_user_errors(tmp_path, bound):
  (tmp_path / "empty.txt").write_text("\n\n   \n")
  bound(train=str(tmp_path / "empty.txt"))
  with pytest.raises(UserError, match="is empty"):
    pipeline.get_dataset(_config())
  latin1 = "café über naïve façade résumé\n".encode("latin-1")
  (tmp_path / "latin1.txt").write_bytes(latin1 * 50)
  bound(train=str(tmp_path / "latin1.txt"))
  with pytest.raises(UserError, match="not UTF-8.*iconv"):
    pipeline.get_dataset(_config())
  bound(train=str(tmp_path / "nothing_*.txt"))
  with pytest.raises(UserError, match="no files match"):
    pipeline.get_dataset(_config())


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory, corpus_dir):
  """A real (not mocked) prepared TFDS dataset, read through the offline path."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  texts = [_doc(5, i) for i in range(40)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="switch_jax_tiny_text", version="1.0.0", data_dir=data_dir,
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      split_datasets={"train": tf.data.Dataset.from_tensor_slices({"text": texts})})
  name = "test_data_tiny_tfds"
  seqio.TaskRegistry.add(
      name, source=sources.tfds_source("switch_jax_tiny_text:1.0.0", splits=["train"]),
      preprocessors=seqio.get_mixture_or_task("local_span_corruption").preprocessors,
      output_features=seqio.get_mixture_or_task("local_span_corruption").output_features)
  yield name, data_dir
  seqio.TaskRegistry.remove(name)


def test_prepared_tfds_data_is_read_from_the_given_directory(tiny_tfds):
  name, data_dir = tiny_tfds
  cfg = _config(mixture_or_task_name=name, tfds_data_dir=data_dir, shuffle=False)
  assert sorted(_documents_seen(cfg)) == list(range(500, 540))


def test_a_prepared_tfds_stream_restores_its_saved_position(tiny_tfds):
  name, data_dir = tiny_tfds
  cfg = _config(mixture_or_task_name=name, tfds_data_dir=data_dir)
  uninterrupted = _take(pipeline.get_batches(cfg), 5)
  interrupted = pipeline.get_batches(cfg)
  _take(interrupted, 3)
  said = []
  resumed = pipeline.get_batches(cfg, start_batch=3, saved_state=interrupted.state(),
                                 warn=said.append)
  assert said == []
  for x, y in zip(uninterrupted[3:], _take(resumed, 2)):
    assert all(np.array_equal(x[k], y[k]) for k in x)


def test_missing_tfds_data_names_dataset_directory_and_fix(tiny_tfds, tmp_path):
  name, _ = tiny_tfds
  empty = str(tmp_path / "no_data_here")
  with pytest.raises(UserError) as error:
    pipeline.get_dataset(_config(mixture_or_task_name=name, tfds_data_dir=empty))
  message = str(error.value)
  assert "switch_jax_tiny_text:1.0.0" in message and name in message
  assert f"{empty}/switch_jax_tiny_text/1.0.0" in message
  assert "tfds build" in message and "--tfds_data_dir" in message
