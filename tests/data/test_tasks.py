"""Registered tasks and mixtures: names, wiring, and batches end to end.

TFDS-backed tasks run on `tfds.testing.mock_data` with a tiny vocabulary
bound in gin in place of T5's (which lives on GCS and is never loaded here).
Every SuperGLUE and GLUE task runs end to end, the training sets through
their mixtures; C4 runs all six tasks; of the 107 mC4 tasks, which differ only
in their split names, two run end to end and all are checked for wiring.
The whole `mc4` mixture end to end takes minutes on 2 cores: it runs when
SWITCH_JAX_SLOW_TESTS=1.
"""

import contextlib
import io
import os
import subprocess
import sys
from unittest import mock

import gin
import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from switch_jax.cli import main as cli
from switch_jax.data import corpus, pipeline, vocabularies
from switch_jax.tasks import mc4, super_glue

LENGTHS = {"inputs": 64, "targets": 16}
PACKED_FEATURES = {"encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens",
                   "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids",
                   "encoder_positions", "decoder_positions"}


@pytest.fixture(scope="module", autouse=True)
def tiny_vocab(tmp_path_factory):
  """Binds the C4 and mC4 vocabularies to one trained here (about 400 ids)."""
  docs = corpus.collect_documents(os.path.join(corpus.stdlib_dir(), "json"))
  text = tmp_path_factory.mktemp("text") / "docs.txt"
  text.write_text("\n".join(docs) + "\n" + "a b c d e f g h i j\n" * 20)
  vocab = vocabularies.train_sentencepiece(
      [str(text)], 300, str(tmp_path_factory.mktemp("vocab")))
  for name in ("c4_vocabulary_path.path", "mc4_vocabulary_path.path"):
    gin.bind_parameter(name, vocab.sentencepiece_model_file)
  yield vocab
  gin.bind_parameter("c4_vocabulary_path.path", vocabularies.C4_VOCAB_PATH)
  gin.bind_parameter("mc4_vocabulary_path.path", vocabularies.MC4_VOCAB_PATH)


@contextlib.contextmanager
def mock_tfds(num_examples=6):
  """TFDS mock data; TFDS 4.9 code refuses c4 3.0.1 (files only), so allow it here."""
  pick_version = tfds.core.dataset_builder.DatasetBuilder._pick_version

  def allow_301(builder, requested):
    if str(requested) == "3.0.1":
      return tfds.core.Version("3.0.1")
    return pick_version(builder, requested)

  with tfds.testing.mock_data(num_examples=num_examples,
                              policy=tfds.testing.MockPolicy.USE_CODE), \
      mock.patch.object(tfds.core.dataset_builder.DatasetBuilder, "_pick_version", allow_301):
    yield


def _first_batch(name, split="train", batch_size=4):
  # Unshuffled: a shuffled task fills a 1000-example buffer before its first batch.
  with mock_tfds():
    cfg = pipeline.DatasetConfig(name, LENGTHS, split=split, batch_size=batch_size, seed=0,
                                 shuffle=False)
    return next(pipeline.get_batches(cfg))


def _check_batch(batch, vocab_size, pack=True):
  expected = PACKED_FEATURES if pack else {k for k in PACKED_FEATURES if "segment" not in k
                                           and "position" not in k}
  assert set(batch) == expected
  assert batch["encoder_input_tokens"].shape == (4, 64)
  assert batch["decoder_target_tokens"].shape == (4, 16)
  assert batch["encoder_input_tokens"].max() < vocab_size
  assert batch["decoder_loss_weights"].sum() >= 4  # every row has real targets
  # Teacher forcing: decoder inputs are the targets shifted right (per segment).
  targets, inputs = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
  starts = inputs == 0
  assert np.array_equal(inputs[:, 1:][~starts[:, 1:]], targets[:, :-1][~starts[:, 1:]])


def test_registered_names_and_counts():
  import switch_jax.tasks  # noqa: F401  pylint: disable=unused-import
  tasks = seqio.TaskRegistry.names()
  ours = {n for n in tasks if n.startswith(("c4", "mc4.", "super_glue_", "glue_", "local_",
                                            "embedded_"))}
  counts = {prefix: sum(n.startswith(prefix) for n in ours)
            for prefix in ("c4", "mc4.", "super_glue_", "glue_", "local_", "embedded_")}
  assert counts == {"c4": 6, "mc4.": 107, "super_glue_": 10, "glue_": 12, "local_": 3,
                    "embedded_": 4}
  assert {"c4_v220_span_corruption", "c4_span_corruption", "mc4.zh_Latn",
          "super_glue_wsc_v102", "super_glue_axg_v102", "glue_stsb_v002"} <= ours
  assert {"mc4", "super_glue_v102_proportional", "glue_v002_proportional"} <= set(
      seqio.MixtureRegistry.names())


def test_registration_reads_no_vocabulary_and_no_data():
  code = ("import switch_jax.tasks, seqio; from switch_jax.data import vocabularies as v; "
          "from switch_jax.tasks import c4; "
          "assert v.extra_ids_for.cache_info().currsize == 0; "
          "assert c4.VOCABULARY._resolved_path is None; "
          "print(len(seqio.TaskRegistry.names()))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=False, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert int(result.stdout.split()[-1]) >= 141


def test_mixture_rates():
  sg = seqio.get_mixture_or_task("super_glue_v102_proportional")
  rates = {t.name: sg.get_rate(t) for t in sg.tasks}
  assert rates == {super_glue.task_name(n): r for n, r in super_glue.TRAIN_EXAMPLES.items()}
  g = seqio.get_mixture_or_task("glue_v002_proportional")
  assert {t.name: g.get_rate(t) for t in g.tasks}["glue_qqp_v002"] == 363846
  fake = mock.Mock(spec=seqio.Task)
  fake.num_input_examples.return_value = 10_000
  assert mc4.temperature_rate(fake) == pytest.approx(10_000 ** 0.3)
  fake.num_input_examples.side_effect = KeyError("train")
  assert mc4.temperature_rate(fake) == 1.0


def test_every_mc4_task_is_wired_to_its_language():
  mixture = seqio.get_mixture_or_task("mc4")
  assert len(mixture.tasks) == len(mc4.LANGUAGES) == 107
  for lang, task in zip(mc4.LANGUAGES, mixture.tasks):
    assert task.name == "mc4." + lang.replace("-", "_")
    loader = task.source.tfds_dataset
    assert loader.name == "c4/multilingual:3.0.1" and loader._read_only
    assert (loader._map_split("train"), loader._map_split("validation")) == (
        lang, f"{lang}-validation")
    assert task.output_features["targets"].vocabulary is mc4.VOCABULARY
  assert mixture.get_rate(mixture.tasks[0]) > 0


@pytest.mark.parametrize("name", [
    "c4_span_corruption", "c4_prefix_lm", "c4_iid_denoising", "c4_v220_span_corruption",
    "c4_v220_prefix_lm", "c4_v220_iid_denoising", "mc4.en", "mc4.zh_Latn",
    "super_glue_v102_proportional", "glue_v002_proportional"])
def test_training_tasks_and_mixtures_give_packed_batches(name, tiny_vocab):
  _check_batch(_first_batch(name), tiny_vocab.vocab_size)


@pytest.mark.parametrize("name,split", [
    ("super_glue_axb_v102", "test"), ("super_glue_axg_v102", "test"),
    ("glue_ax_v002", "test"), ("glue_mnli_matched_v002", "validation"),
    ("glue_mnli_mismatched_v002", "validation")])
def test_eval_only_tasks_give_batches(name, split, tiny_vocab):
  _check_batch(_first_batch(name, split=split), tiny_vocab.vocab_size)


@pytest.mark.parametrize("name", sorted(super_glue.METRICS.keys() - {"axb", "axg"}))
def test_super_glue_validation_sets_give_unpacked_eval_batches(name, tiny_vocab):
  with mock_tfds(num_examples=3):
    cfg = pipeline.DatasetConfig(super_glue.task_name(name), LENGTHS, split="validation",
                                 batch_size=4)
    batches = list(pipeline.get_eval_batches(cfg))
  _check_batch(batches[0], tiny_vocab.vocab_size, pack=False)
  # Mock sets hold 3 records (ReCoRD: one row per answer); zero rows pad the last batch.
  rows = sum(int((b["decoder_loss_weights"].sum(axis=1) > 0).sum()) for b in batches)
  assert rows >= 3 and rows <= 4 * len(batches)
  if name != "record":
    assert rows == 3


@pytest.mark.skipif(os.environ.get("SWITCH_JAX_SLOW_TESTS") != "1",
                    reason="builds 107 pipelines (minutes); set SWITCH_JAX_SLOW_TESTS=1")
def test_mc4_mixture_end_to_end(tiny_vocab):
  _check_batch(_first_batch("mc4"), tiny_vocab.vocab_size)


def test_tasks_command_lists_and_filters():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(["tasks", "^super_glue_(rte|cb)"]) == 0
  lines = out.getvalue().splitlines()
  assert lines[0].split() == ["super_glue_cb_v102", "tfds", "super_glue/cb:1.0.2"]
  assert lines[-1] == "2 tasks, 0 mixtures"
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert cli.main(["tasks", "no_such_task_xyz"]) == 2
  assert err.getvalue().strip() == (
      "switch-jax tasks: error: no task or mixture matches 'no_such_task_xyz'")


def test_vocab_command_trains_and_reports(tmp_path):
  corpus_file = tmp_path / "corpus.jsonl"
  corpus_file.write_text("\n".join('{"text": "sample sentence number %d about data"}' % i
                                   for i in range(200)))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(["vocab", "--input", str(corpus_file), "--vocab_size", "40",
                     "--out", str(tmp_path / "v")]) == 0
  assert "+ 100 extra ids" in out.getvalue()
  assert os.path.exists(tmp_path / "v" / "sentencepiece.model")
  bad = tmp_path / "utf16.txt"
  bad.write_bytes("some text\n".encode("utf-16"))
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert cli.main(["vocab", "--input", str(bad), "--out", str(tmp_path / "w")]) == 2
  assert "NUL bytes" in err.getvalue() and "iconv" in err.getvalue()
