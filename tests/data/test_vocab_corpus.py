"""SentencePiece training and caching, lazy vocabularies, the embedded corpus."""

import json
import os

import gin
import numpy as np
import pytest
import seqio
from sentencepiece import sentencepiece_model_pb2

from switch_jax.data import corpus, pipeline, vocabularies
import switch_jax.tasks  # noqa: F401  registers the embedded_* tasks the batches name
from switch_jax.errors import UserError

SOURCE = b'''"""Module doc with enough words here."""
# A comment block that spans
# two lines of text.
x = "# not a comment inside a string with words"
y = 1  # a trailing comment is not a document
s = """
# also not a comment, inside a triple-quoted string
"""
def f():
  """Function doc string, long enough."""
  # short
  return 1
class C:
  """Class docstring says something here."""
'''


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  docs = corpus.collect_documents(os.path.join(corpus.stdlib_dir(), "json"))
  path = tmp_path_factory.mktemp("text") / "docs.txt"
  path.write_text("\n".join(docs) + "\n", encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("vocab"))
  return vocabularies.train_sentencepiece([text_file], 200, out), out


def test_trained_vocabulary_has_t5_ids_and_sentinels(trained):
  vocab, out = trained
  with open(os.path.join(out, "sentencepiece.json")) as f:
    info = json.load(f)
  base = info["base_vocab_size"]
  assert 100 < base <= 200
  assert vocab.vocab_size == base + 100 and vocab.extra_ids == 100
  tokenizer = vocab.tokenizer
  assert (tokenizer.pad_id(), tokenizer.eos_id(), tokenizer.unk_id(), tokenizer.bos_id()) == (
      0, 1, 2, -1)
  assert tokenizer.id_to_piece(vocab.vocab_size - 1) == "\u2581<extra_id_0>"
  assert tokenizer.id_to_piece(vocab.vocab_size - 100) == "\u2581<extra_id_99>"
  assert vocab.decode(vocab.encode("Decode JSON data.")) == "Decode JSON data."


def test_training_is_cached_and_deterministic(trained, text_file, tmp_path):
  vocab, out = trained
  model = os.path.join(out, "sentencepiece.model")
  mtime = os.stat(model).st_mtime_ns
  again = vocabularies.train_sentencepiece([text_file], 200, out)
  assert again.sentencepiece_model_file == model and os.stat(model).st_mtime_ns == mtime
  fresh = vocabularies.train_sentencepiece([text_file], 200, str(tmp_path / "fresh"))
  with open(model, "rb") as a, open(fresh.sentencepiece_model_file, "rb") as b:
    assert a.read() == b.read()
  with pytest.raises(UserError, match="already holds a vocabulary"):
    vocabularies.train_sentencepiece([text_file], 150, out)


def test_training_rejects_empty_input(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  with pytest.raises(UserError, match="no text"):
    vocabularies.train_sentencepiece([str(empty)], 100, str(tmp_path / "out"))
  with pytest.raises(UserError, match="no files match"):
    vocabularies.train_sentencepiece([str(tmp_path / "missing*.txt")], 100, str(tmp_path))


def test_both_vocabulary_conventions_give_the_same_ids(trained, tmp_path):
  vocab, _ = trained
  model = sentencepiece_model_pb2.ModelProto.FromString(vocab.sp_model)  # pieces baked in
  baked_path = tmp_path / "baked.model"
  baked_path.write_bytes(model.SerializeToString())
  assert vocabularies.extra_ids_for(vocab.sentencepiece_model_file) == 100
  assert vocabularies.extra_ids_for(str(baked_path)) == 0
  baked = vocabularies.load_vocabulary(str(baked_path))
  assert baked.vocab_size == vocab.vocab_size
  assert baked.encode("Serialize obj to a JSON formatted str.") == vocab.encode(
      "Serialize obj to a JSON formatted str.")


def test_lazy_vocabulary_reads_nothing_until_used_and_follows_its_path(trained, tmp_path):
  vocab, _ = trained
  path = [str(tmp_path / "not_there.model")]
  lazy = vocabularies.LazyVocabulary(lambda: path[0], "test")
  assert "not yet resolved" in str(lazy)
  with pytest.raises(UserError, match="switch-jax vocab"):
    _ = lazy.vocab_size
  path[0] = vocab.sentencepiece_model_file
  assert lazy.vocab_size == vocab.vocab_size and lazy.extra_ids == 100
  path[0] = str(tmp_path / "gone.model")  # a failed switch keeps the working vocabulary
  with pytest.raises(UserError):
    _ = lazy.vocab_size
  path[0] = vocab.sentencepiece_model_file
  assert lazy.encode("JSON") == vocab.encode("JSON")


def test_extract_documents_takes_docstrings_and_comment_blocks_only():
  assert corpus.extract_documents("m.py", SOURCE) == [
      "Module doc with enough words here.",
      "A comment block that spans two lines of text.",
      "Function doc string, long enough.",
      "Class docstring says something here.",
  ]
  assert corpus.extract_documents("broken.py", b"def (:\n") == []


def test_split_is_a_pure_function_of_each_document():
  docs = [f"document number {i} has some words" for i in range(2000)]
  train, validation = corpus.split_documents(docs)
  train_r, validation_r = corpus.split_documents(list(reversed(docs)))
  assert (train, validation) == (train_r, validation_r)
  assert sorted(validation + [d for shard in train for d in shard]) == sorted(docs)
  assert 0.01 < len(validation) / len(docs) < 0.035
  assert min(len(s) for s in train) > 150  # 8 shards of roughly 245


def test_small_corpus_builds_byte_identically(tmp_path):
  source = os.path.join(corpus.stdlib_dir(), "json")
  a = corpus.embedded_corpus(str(tmp_path / "a"), source, vocab_size=300)
  b = corpus.embedded_corpus(str(tmp_path / "b"), source, vocab_size=300)
  assert os.path.basename(a.directory) == os.path.basename(b.directory)
  for name in sorted(os.listdir(a.directory)):
    if name not in ("stats.json", "sentencepiece.json"):  # these record times and paths
      with open(os.path.join(a.directory, name), "rb") as fa, \
          open(os.path.join(b.directory, name), "rb") as fb:
        assert fa.read() == fb.read(), name
  assert a.stats["documents"] == b.stats["documents"]


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("cache"))
  gin.bind_parameter("embedded_corpus.cache_dir", cache)
  yield corpus.embedded_corpus()
  gin.bind_parameter("embedded_corpus.cache_dir", None)


def test_stdlib_corpus_size(stdlib_corpus):
  stats = stdlib_corpus.stats
  # Python 3.11.7: 33867 / 706 documents, 1.12M / 28k tokens; other versions differ.
  assert stats["documents"]["train"] > 20_000
  assert stats["tokens"]["train"] > 800_000
  assert stats["vocab_size"] == 8100
  val_share = stats["documents"]["validation"] / sum(stats["documents"].values())
  assert 0.01 < val_share < 0.03
  lines = open(stdlib_corpus.train_files[0], encoding="utf-8").read().split("\n")[:-1]
  assert len(lines) > 2000 and all(line.strip() == line and line for line in lines)


def test_embedded_span_corruption_end_to_end(stdlib_corpus):
  cfg = pipeline.DatasetConfig("embedded_span_corruption", {"inputs": 128, "targets": 32},
                               batch_size=4, seed=0)
  batch = next(pipeline.get_batches(cfg))
  assert batch["encoder_input_tokens"].shape == (4, 128)
  assert batch["decoder_target_tokens"].shape == (4, 32)
  # Packed rows are full of text; the first sentinel of each segment is 8099.
  assert np.mean(batch["encoder_input_tokens"] > 0) > 0.9
  assert 8099 in batch["encoder_input_tokens"][0]
  vocab = vocabularies.load_vocabulary(stdlib_corpus.vocabulary_file)
  assert vocab.vocab_size == 8100
  text = vocab.decode(batch["decoder_target_tokens"][0].tolist())
  assert sum(c.isalpha() for c in text) > 10
  for objective, lengths in (("prefix_lm", (64, 64)), ("iid_denoising", (64, 32))):
    cfg = pipeline.DatasetConfig(f"embedded_{objective}",
                                 {"inputs": lengths[0], "targets": lengths[1]},
                                 batch_size=2, seed=0, split="validation")
    batch = next(pipeline.get_batches(cfg))
    assert batch["decoder_target_tokens"].shape == (2, lengths[1])
    assert batch["decoder_loss_weights"].sum() > lengths[1]


def test_embedded_continuation_task_end_to_end(stdlib_corpus):
  task = seqio.get_mixture_or_task("embedded_continuation")
  examples = list(task.get_dataset({"inputs": 512, "targets": 4}, split="validation",
                                   shuffle=False).as_numpy_iterator())
  vocab = task.output_features["targets"].vocabulary
  targets = [vocab.decode(ex["targets"].tolist()) for ex in examples]
  # Python 3.11.7: 1,031 validation pairs (the corpus's validation file and train shard 0).
  assert len(examples) > 500
  assert set(targets) == {"True", "False"}
  assert 0.35 < targets.count("True") / len(targets) < 0.65
  text = vocab.decode(examples[0]["inputs"].tolist())
  assert text.startswith("continuation sentence1: ") and " sentence2: " in text
  # Scored as SuperGLUE's RTE is: the label's class id, then accuracy in percent.
  assert task.postprocess_fn("True", example=None, is_target=True) == 1
  assert task.metric_fns[0]([1, 0, 1], [1, 1, 1]) == {"accuracy": pytest.approx(200 / 3)}
