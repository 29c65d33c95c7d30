"""Text corpora and SentencePiece models on gs:// paths, against the local
Cloud Storage emulator: the same globs, gzip, JSON lines, checks and errors
as for local files, through the file layer (switch_jax.storage) that the
rest of the package reads and writes buckets with.
"""

import gzip
import json

import numpy as np
import pytest
from etils import epath

from gcs_emulator import emulator  # noqa: F401  pylint: disable=unused-import  # the fixture
from switch_jax.data import sources, vocabularies
from switch_jax.errors import UserError

DATA = "gs://bucket/text"
DOCS = {"part0.txt": ["expert router token", "switch layer"],
        "part1.txt": ["capacity factor", "load balancing loss", "top one"]}


@pytest.fixture(scope="module")
def bucket_text(emulator):  # noqa: F811
  """DOCS as plain files, a gzipped JSON-lines file with one broken line, a
  folder whose name matches the glob, and a file that does not."""
  for name, docs in DOCS.items():
    epath.Path(f"{DATA}/{name}").write_text("\n".join(docs) + "\n")
  lines = [json.dumps({"text": "gzipped json"}), "{not json", json.dumps({"text": "second"})]
  epath.Path(f"{DATA}/more.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
  epath.Path(f"{DATA}/part9.txt/inside.txt").write_text("a folder, not a part\n")
  epath.Path(f"{DATA}/notes.md").write_text("not matched\n")
  return DATA


def test_globs_list_matching_objects_only(bucket_text):
  assert sources.expand_file_patterns(f"{bucket_text}/part*.txt") == [
      f"{bucket_text}/part0.txt", f"{bucket_text}/part1.txt"]
  both = sources.expand_file_patterns([f"{bucket_text}/*.gz", f"{bucket_text}/part0.txt",
                                       f"{bucket_text}/part?.txt"])
  assert both == [f"{bucket_text}/more.jsonl.gz", f"{bucket_text}/part0.txt",
                  f"{bucket_text}/part1.txt"]


@pytest.mark.parametrize("pattern,message", [
    ("gs://bucket/text/nothing*.txt", "no files match"),
    ("gs://bucket/text/missing.txt", "no files match"),
    ("gs://bucket/text/**/*.txt", r"recursive \*\* patterns are not supported"),
])
def test_missing_corpus_files_are_user_errors(bucket_text, pattern, message):
  with pytest.raises(UserError, match=message):
    sources.expand_file_patterns(pattern)


def test_documents_and_checks_read_through_the_file_layer(bucket_text):
  assert list(sources.read_documents(f"{bucket_text}/part1.txt")) == DOCS["part1.txt"]
  # The broken JSON line is skipped; gzip is undone on the way.
  assert list(sources.read_documents(f"{bucket_text}/more.jsonl.gz")) == [
      "gzipped json", "second"]
  files = sources.checked_text_files((f"{bucket_text}/part*.txt", f"{bucket_text}/*.gz"))
  assert len(files) == 3
  epath.Path(f"{bucket_text}/bad/latin1.txt").write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 50)
  with pytest.raises(UserError, match="latin1.txt is not UTF-8"):
    sources.check_text_file(f"{bucket_text}/bad/latin1.txt")
  epath.Path(f"{bucket_text}/bad/fake.txt.gz").write_text("plain text\n")
  with pytest.raises(UserError, match="fake.txt.gz ends in .gz but is not gzip data"):
    sources.check_text_file(f"{bucket_text}/bad/fake.txt.gz")


def test_text_files_source_streams_every_document_of_a_bucket(bucket_text):
  files = sources.expand_file_patterns([f"{bucket_text}/part*.txt", f"{bucket_text}/*.gz"])
  source = sources.TextFilesSource(lambda split: files, splits=("train",))
  texts = [x["text"].decode() for x in source.get_dataset("train", shuffle=False)
           .as_numpy_iterator()]
  # A broken JSON line is an empty document, dropped later by the preprocessors.
  assert sorted(texts) == sorted(DOCS["part0.txt"] + DOCS["part1.txt"]
                                 + ["gzipped json", "", "second"])


def test_text_files_source_hands_lines_over_in_blocks(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_LINES_PER_BLOCK", 4)  # JSON lines are parsed in blocks
  lines = [f"line {i}" for i in range(10)]  # blocks of 4, 4 and 2
  (tmp_path / "ten.jsonl").write_text("\r\n".join(json.dumps({"text": l}) for l in lines) + "\r\n")
  (tmp_path / "ten.txt").write_text("\r\n".join(lines) + "\r\n")
  for name in ("ten.jsonl", "ten.txt"):
    source = sources.TextFilesSource(lambda split, name=name: [str(tmp_path / name)],
                                     splits=("train",))
    texts = [x["text"].decode() for x in source.get_dataset("train", shuffle=False)
             .as_numpy_iterator()]
    assert texts == lines, name


def test_a_vocabulary_on_a_bucket_is_trained_read_and_used(bucket_text, corpus, tmp_path):
  root, local_model = corpus
  remote = f"{bucket_text}/vocab/sentencepiece.model"
  epath.Path(remote).write_bytes(epath.Path(local_model).read_bytes())
  local, on_bucket = (vocabularies.load_vocabulary(p) for p in (local_model, remote))
  text = "expert router token capacity"
  assert on_bucket.extra_ids == local.extra_ids == vocabularies.EXTRA_IDS
  assert on_bucket.vocab_size == local.vocab_size
  ids = on_bucket.encode(text)
  assert ids == local.encode(text) and len(ids) > 0
  np.testing.assert_array_equal(on_bucket.encode_tf(text).numpy(), ids)
  assert on_bucket.decode(ids) == text

  # Input and output on the bucket: the same model bytes as a local training.
  epath.Path(f"{bucket_text}/corpus/train.txt").write_bytes((root / "train.txt").read_bytes())
  trained = vocabularies.train_sentencepiece([f"{bucket_text}/corpus/train.txt"], 120,
                                             f"{bucket_text}/trained")
  assert trained.sentencepiece_model_file == f"{bucket_text}/trained/sentencepiece.model"
  assert (epath.Path(trained.sentencepiece_model_file).read_bytes()
          == epath.Path(local_model).read_bytes())
  info = json.loads(epath.Path(f"{bucket_text}/trained/sentencepiece.json").read_text())
  assert info["training_lines"] == 500
  assert trained.encode(text) == ids


def test_a_missing_vocabulary_on_a_bucket_is_a_user_error(emulator):  # noqa: F811
  with pytest.raises(UserError, match="cannot read the SentencePiece vocabulary "
                     "'gs://bucket/none/sentencepiece.model' .FileNotFoundError."):
    vocabularies.load_vocabulary("gs://bucket/none/sentencepiece.model")
