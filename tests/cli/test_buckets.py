"""The whole CLI on gs:// paths, against a local Cloud Storage emulator: a
tiny train to gs://bucket/run (checkpoints, metrics parts, TensorBoard),
then eval, infer, score, convert both ways and plot, each reading and
writing the bucket; and a missing object named in one line, no traceback.

Training runs as its own process, as a user runs it, with the emulator's
variables (gcs_emulator.environment) in its environment; the other commands
run in this process (`main`, as the console script calls it), pointed at the
same emulator, which saves their start-up time.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from etils import epath

import gcs_emulator
import test_storage
from gcs_emulator import emulator  # noqa: F401  pylint: disable=unused-import  # the fixture
from switch_jax import run_logging, storage
from switch_jax.cli import main as cli

RUN = "gs://bucket/run"


def _ok(capsys, *args) -> str:
  code = cli.main(list(args))
  out, err = capsys.readouterr()
  assert code == 0, (args[0], out[-2000:], err[-4000:])
  return out


def _upload(local, target: str) -> str:
  epath.Path(target).write_bytes(epath.Path(local).read_bytes())
  return target


@pytest.fixture(scope="module")
def bucket_corpus(emulator, corpus):  # noqa: F811
  """The corpus and its vocabulary on the bucket: (gs:// folder, gs:// model)."""
  root, vocab = corpus
  for name in ("train.txt", "validation.txt"):
    _upload(root / name, f"gs://bucket/data/{name}")
  return epath.Path("gs://bucket/data"), _upload(vocab, "gs://bucket/data/spm/sentencepiece.model")


@pytest.fixture(scope="module")
def trained(emulator, bucket_corpus):  # noqa: F811
  """A tiny train whose corpus, vocabulary and MODEL_DIR are all on the bucket."""
  root, vocab = bucket_corpus
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             **gcs_emulator.environment(emulator))
  proc = subprocess.run([
      sys.executable, "-m", "switch_jax.cli.main", "train", "--num_cpu_devices=8",
      "--gin_file=models/tiny_switch.gin",
            "--gin_file=runs/pretrain.gin", "--gin_file=mesh/cpu8.gin",
            f'--gin.MODEL_DIR="{RUN}"', '--gin.MIXTURE_OR_TASK_NAME="local_span_corruption"',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.TRAIN_STEPS=4",
            "--gin.BATCH_SIZE=8", f'--gin.local_files.train="{root / "train.txt"}"',
            f'--gin.local_files.validation="{root / "validation.txt"}"',
            f'--gin.local_vocabulary_path.path="{vocab}"', "--gin.ModelConfig.vocab_size=256",
            "--gin.LoopConfig.log_period=1", "--gin.EvalConfig.period=2",
            "--gin.EvalConfig.steps=1", "--gin.CheckpointConfig.period=2",
            "--gin.make_optimizer.name='adam'"],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "Done at step 4" in proc.stdout, (
      proc.stdout[-2000:], proc.stderr[-4000:])
  return root, vocab


def test_train_writes_checkpoints_metrics_and_tensorboard_to_the_bucket(trained, tmp_path):
  files = [str(p) for p in storage.files(RUN)]
  assert f"{RUN}/config.gin" in files and f"{RUN}/train_summary.json" in files
  for step in (2, 4):  # CheckpointConfig.period 2, and the last step
    assert f"{RUN}/checkpoints/{step}/params/_METADATA" in files
  assert not any(f.endswith("/metrics.jsonl") for f in files)  # parts only on a bucket
  parts = [f for f in files if f.startswith(f"{RUN}/metrics-")]
  # One part per checkpoint (steps 2 and 4): what a run logged goes up when it saves.
  assert parts == [f"{RUN}/metrics-00000.jsonl", f"{RUN}/metrics-00001.jsonl"]
  first = [json.loads(line) for line in epath.Path(parts[0]).read_text().splitlines()]
  assert [r["step"] for r in first if r["split"] == "train"] == [1, 2]
  records = run_logging.read_records(RUN, None)
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
  assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4]
  runs = test_storage.events(test_storage.download(RUN, tmp_path))
  assert sorted(runs) == ["eval", "train"]  # one run per split, none per expert
  assert [step for step, _ in runs["train"]["loss"]] == [1, 2, 3, 4]
  assert [step for step, _ in runs["eval"]["loss"]] == [2, 4]
  # tiny_switch: Switch layers encoder/layers_1 and decoder/layers_1
  for layer in ("encoder/layers_1", "decoder/layers_1"):
    assert runs["train"][f"expert_load/{layer}"][-1] == (4, "histogram")
  assert runs["train"]["config.gin/text_summary"] == [(0, "text")]


def test_eval_infer_score_convert_and_plot_on_bucket_paths(trained, capsys):
  root, vocab = trained
  data = [f'--gin.local_files.validation="{root / "validation.txt"}"',
          f'--gin.local_vocabulary_path.path="{vocab}"']
  out = _ok(capsys, "eval", "--checkpoint", RUN, "--task", "local_span_corruption",
            "--feature_lengths", "32,8", "--batch_size", "8", "--max_examples", "8",
            "--output_dir", "gs://bucket/eval", *data)
  assert out.splitlines()[0].split() == ["step", "4"]
  epath.Path("gs://bucket/in/questions.txt").write_text("expert router token\nswitch layer\n")
  epath.Path("gs://bucket/in/examples.jsonl").write_text(
      '{"inputs": [5, 6, 7, 1], "targets": [8, 1]}\n{"inputs": [9, 1], "targets": [10, 11, 1]}\n')
  _ok(capsys, "infer", "--checkpoint", f"{RUN}/checkpoints/2", "--input_file",
      "gs://bucket/in/questions.txt", "--vocab", str(vocab), "--output",
      "gs://bucket/out/preds.jsonl", "--max_decode_length", "4", "--batch_size", "2")
  _ok(capsys, "score", "--checkpoint", RUN, "--examples", "gs://bucket/in/examples.jsonl",
      "--out", "gs://bucket/out/scores.jsonl", "--batch_size", "2")
  _ok(capsys, "convert", "--to", "hf", "--checkpoint", RUN, "--out", "gs://bucket/hf",
      "--expert_capacity", "8")
  _ok(capsys, "convert", "--from", "hf", "--hf_dir", "gs://bucket/hf", "--out",
      "gs://bucket/converted")
  _ok(capsys, "score", "--checkpoint", "gs://bucket/converted", "--examples",
      "gs://bucket/in/examples.jsonl", "--out", "gs://bucket/out/scores_converted.jsonl")
  _ok(capsys, "plot", RUN, "--out", "gs://bucket/plots")
  read = lambda p: epath.Path(p).read_text()
  jsonl = lambda p: [json.loads(line) for line in read(p).splitlines()]
  results = {
      "eval": json.loads(read("gs://bucket/eval/eval_results.json")),
      "preds": jsonl("gs://bucket/out/preds.jsonl"),
      "scores": jsonl("gs://bucket/out/scores.jsonl"),
      "converted": jsonl("gs://bucket/out/scores_converted.jsonl"),
      "hf": sorted(p.name for p in epath.Path("gs://bucket/hf").iterdir()),
      "model": sorted(p.name for p in epath.Path("gs://bucket/converted").iterdir()),
      "png": [epath.Path(f"gs://bucket/plots/{n}").read_bytes()[:8].hex()
              for n in ("loss.png", "expert_load.png")]}
  assert results["eval"]["step"] == 4 and results["eval"]["evaluated"] == f"{RUN}/checkpoints/4"
  assert np.isfinite(results["eval"]["metrics"]["cross_entropy"])
  assert [p["input"] for p in results["preds"]] == ["expert router token", "switch layer"]
  assert [s["tokens"] for s in results["scores"]] == [2, 3]
  # The HF export and its re-import are the same model: equal scores.
  np.testing.assert_allclose([s["loss"] for s in results["converted"]],
                             [s["loss"] for s in results["scores"]], rtol=1e-5)
  assert results["hf"] == ["config.json", "model.safetensors"]
  assert results["model"] == ["config.json", "metadata.json", "params"]
  assert results["png"] == ["89504e470d0a1a0a"] * 2  # PNG signatures


@pytest.mark.parametrize("args,message", [
    (["eval", "--checkpoint", "gs://bucket/nothing", "--task", "local_span_corruption"],
     "checkpoint gs://bucket/nothing does not exist"),
    (["score", "--checkpoint", RUN, "--examples", "gs://bucket/no.jsonl"],
     "examples file gs://bucket/no.jsonl does not exist"),
    (["plot", "gs://bucket/nothing"], "gs://bucket/nothing has no metrics.jsonl"),
    (["convert", "--from", "hf", "--hf_dir", "gs://bucket/no_hf", "--out", "gs://bucket/x"],
     "HF model directory gs://bucket/no_hf does not exist"),
    (["eval", "--checkpoint", "gs://no-such-bucket/run", "--task", "local_span_corruption"],
     "checkpoint gs://no-such-bucket/run does not exist"),
])
def test_a_missing_bucket_object_is_one_clear_line(emulator, capsys, args, message):  # noqa: F811
  code = cli.main(args)
  out, err = capsys.readouterr()
  assert code == 2, (out, err[-3000:])
  assert message in err and "Traceback" not in err, err[-3000:]
