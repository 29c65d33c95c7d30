"""Resuming the training stream from a saved iterator state: the batches
after a restore are the uninterrupted stream's, bit for bit, and a restore
at batch 30 reads no more of the corpus than one at batch 2. Where the state
cannot be used (another host count, an old checkpoint, a pipeline with
Python state) the stream is replayed, after one line saying why."""

import gzip
import json

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

import switch_jax.tasks  # noqa: F401  registers the tasks and their gin configurables
from switch_jax.checkpoints import data_position
from switch_jax.data import iterator_state, pipeline, sources, vocabularies
from switch_jax.training import trainer

LENGTHS = {"inputs": 32, "targets": 8}
WORDS = "expert router token capacity layer switch sparse dense gate loss shard mesh".split()
MIXTURE = "test_resume_span_and_iid"
# One pass over the corpus is 12 batches of span corruption (24 of the mixture): the
# streams compared below go into the second epoch (files and examples
# shuffled again).
DOCS_PER_FILE = 12


def _documents(seed, count):
  rng = np.random.default_rng(seed)
  return [f"doc {seed}-{i} " + " ".join(rng.choice(WORDS, size=rng.integers(4, 30)))
          for i in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Plain text, gzipped JSON lines (one broken line) and JSON lines; a
  small vocabulary; a mixture of two objectives over them."""
  root = tmp_path_factory.mktemp("resume_corpus")
  (root / "a.txt").write_text("\n".join(_documents(0, DOCS_PER_FILE)) + "\n")
  lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(_documents(1, DOCS_PER_FILE))]
  (root / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(lines[:5] + ["{broken"]
                                                            + lines[5:]).encode()))
  (root / "c.jsonl").write_text("\n".join(json.dumps({"text": d})
                                          for d in _documents(2, DOCS_PER_FILE)))
  vocab = vocabularies.train_sentencepiece([str(root / "a.txt")], 60,
                                           str(tmp_path_factory.mktemp("resume_vocab")))
  gin.bind_parameter("local_vocabulary_path.path", vocab.sentencepiece_model_file)
  gin.bind_parameter("local_files.train", [str(root / "a.txt"), str(root / "*.json*")])
  seqio.MixtureRegistry.add(MIXTURE, [("local_span_corruption", 1.0),
                                      ("local_iid_denoising", 1.0)])
  yield root
  seqio.MixtureRegistry.remove(MIXTURE)
  gin.bind_parameter("local_vocabulary_path.path", None)
  gin.bind_parameter("local_files.train", None)


def _config(name="local_span_corruption", **kwargs):
  return pipeline.DatasetConfig(name, LENGTHS, **{"batch_size": 4, "seed": 5, **kwargs})


def _take(batches, n):
  return [next(batches) for _ in range(n)]


def _assert_same(expected, actual):
  assert len(expected) == len(actual)
  for x, y in zip(expected, actual):
    assert sorted(x) == sorted(y)
    for name in x:
      np.testing.assert_array_equal(x[name], y[name], err_msg=name)


@pytest.mark.parametrize("name,pack", [("local_span_corruption", True),
                                       ("local_span_corruption", False), (MIXTURE, True)])
def test_a_restored_stream_is_the_uninterrupted_one(corpus, name, pack):
  cfg = _config(name, pack=pack)
  uninterrupted = _take(pipeline.get_batches(cfg), 16)
  interrupted = pipeline.get_batches(cfg)
  _assert_same(uninterrupted[:9], _take(interrupted, 9))
  state = interrupted.state()
  said = []
  resumed = pipeline.get_batches(cfg, start_batch=9, saved_state=state, warn=said.append)
  assert said == [] and resumed.position == 9
  _assert_same(uninterrupted[9:], _take(resumed, 7))
  # The state was taken between two batches: the one it was taken from goes on alike.
  _assert_same(uninterrupted[9:], _take(interrupted, 7))
  assert resumed.position == interrupted.position == 16


def test_a_second_host_restores_its_own_shard(corpus):
  cfg = _config()
  uninterrupted = _take(pipeline.get_batches(cfg, 1, 2), 5)
  host = pipeline.get_batches(cfg, 1, 2)
  _take(host, 3)
  resumed = pipeline.get_batches(cfg, 1, 2, start_batch=3, saved_state=host.state())
  _assert_same(uninterrupted[3:], _take(resumed, 2))
  said = []  # host 0 cannot take host 1's state
  pipeline.get_batches(cfg, 0, 2, start_batch=3, saved_state=host.state(), warn=said.append)
  assert len(said) == 1 and "another shard" in said[0] and "replaying 3 batches" in said[0]


def _lines_parsed(monkeypatch):
  """Counts the JSON lines the source parses from now on."""
  counter = {"lines": 0}
  parse = sources._json_texts  # pylint: disable=protected-access

  def counting(lines, text_key):
    counter["lines"] += len(lines)
    return parse(lines, text_key)
  monkeypatch.setattr(sources, "_json_texts", counting)
  return counter


def test_resuming_at_batch_30_reads_what_resuming_at_batch_2_does(corpus, monkeypatch):
  cfg = _config()
  stream = pipeline.get_batches(cfg)
  states = {}
  for position in range(1, 31):
    next(stream)
    if position in (2, 30):
      states[position] = stream.state()
  counter = _lines_parsed(monkeypatch)
  read = {}
  for position, state in states.items():
    counter["lines"] = 0
    _take(pipeline.get_batches(cfg, start_batch=position, saved_state=state), 5)
    read[position] = counter["lines"]
  counter["lines"] = 0
  _take(pipeline.get_batches(cfg, start_batch=30), 5)  # the replay, for scale
  replayed = counter["lines"]
  # Measured: {2: 0, 30: 0} lines, the replay 700. A restored iterator holds
  # seqio's 1000-example shuffle buffer, so its next batches need no reading;
  # the replay refills that buffer from the files. Reads go in blocks of
  # lines: allow two blocks of difference.
  block = sources._LINES_PER_BLOCK  # pylint: disable=protected-access
  assert abs(read[30] - read[2]) <= 2 * block, (read, replayed)
  assert replayed > read[30] + 500, (read, replayed)


def test_a_pipeline_with_python_state_says_it_replays(corpus):
  def generated(split, shuffle_files=False, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_generator(
        lambda: ({"text": d} for d in _documents(3, 200)),
        output_signature={"text": tf.TensorSpec([], tf.string)})
  task = seqio.get_mixture_or_task("local_span_corruption")
  seqio.TaskRegistry.add("test_resume_generated",
                         source=seqio.FunctionDataSource(generated, splits=["train"]),
                         preprocessors=task.preprocessors, output_features=task.output_features)
  try:
    cfg = _config("test_resume_generated")
    stream = pipeline.get_batches(cfg)
    first = _take(stream, 3)
    said = []
    assert stream.state_or_none(said.append) is None
    assert stream.state_or_none(said.append) is None  # said once, not tried again
    assert len(said) == 1 and "cannot save its position" in said[0]
    assert "(PyFunc is stateful)" in said[0] and "replays" in said[0]
    assert "{{" not in said[0] and "[Op:" not in said[0]
    with pytest.raises(iterator_state.PositionNotSaved, match="PyFunc is stateful"):
      stream.state()
    _assert_same(first[2:], _take(pipeline.get_batches(cfg, start_batch=2), 1))
  finally:
    seqio.TaskRegistry.remove("test_resume_generated")


def test_an_unfitting_state_replays_and_says_why(corpus):
  cfg = _config()
  stream = pipeline.get_batches(cfg)
  uninterrupted = _take(stream, 4)
  state = stream.state()
  said = []
  other_settings = pipeline.get_batches(_config(seed=6), start_batch=4, saved_state=state,
                                        warn=said.append)
  assert "saved for other data settings" in said[-1] and other_settings.position == 4
  wrong_count = pipeline.get_batches(cfg, start_batch=3, saved_state=state, warn=said.append)
  assert "it is at batch 4, the checkpoint's record says 3" in said[-1]
  _assert_same(uninterrupted[3:], _take(wrong_count, 1))  # replayed, so still right
  pipeline.get_batches(cfg, start_batch=4, saved_state=b"not a zip", warn=said.append)
  assert "does not fit this pipeline (BadZipFile" in said[-1]
  assert all("replaying" in line for line in said) and len(said) == 3


def test_each_host_writes_and_reads_its_own_file(tmp_path):
  handler = data_position.DataPositionHandler()
  for index in range(2):
    handler.save(tmp_path, data_position.DataPositionSave(f"host {index}".encode(), index, 2))
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "process_00000-of-00002", "process_00001-of-00002"]
  found = handler.restore(tmp_path, data_position.DataPositionRestore(1, 2))
  assert found.state == b"host 1" and found.host_counts() == [2]
  other = handler.restore(tmp_path, data_position.DataPositionRestore(0, 4))
  assert other.state is None and other.host_counts() == [2]


def test_the_trainer_says_why_it_replays(corpus, capsys):
  cfg = _config()
  saved = data_position.SavedPosition(None, ("process_00000-of-00002",
                                             "process_00001-of-00002"))
  trainer._host_batches(cfg, 5, 10, saved)  # pylint: disable=protected-access
  trainer._host_batches(cfg, 5, 10, None)  # pylint: disable=protected-access
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines == [
      "WARNING: checkpoint 10 saved the data positions of 2 hosts and this run has 1; each "
      "host reads its own shard, so these hosts' streams are not the uninterrupted run's; "
      "replaying 5 batches of the input to get back to its position (each is read and "
      "preprocessed again)",
      "WARNING: checkpoint 10 has no saved data position (saved by an older switch_jax, or by "
      "a data pipeline that cannot save one); replaying 5 batches of the input to get back "
      "to its position (each is read and preprocessed again)"]
