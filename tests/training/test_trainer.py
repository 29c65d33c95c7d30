"""The train loop end to end: the real CLI killed and resumed, and
fine-tuning a converted Hugging Face checkpoint on a mocked SuperGLUE task."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

import xla_cache

from switch_jax import run_logging
from switch_jax.cli import gin_config
from switch_jax.checkpoints import model_format

def _train_args(corpus, model_dir, steps):
  root, vocab = corpus
  return [
      "--num_cpu_devices=8", "--gin_file=models/tiny_switch.gin", "--gin_file=runs/pretrain.gin",
      "--gin_file=mesh/cpu8.gin", f'--gin.MODEL_DIR="{model_dir}"',
      '--gin.MIXTURE_OR_TASK_NAME="local_span_corruption"',
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", f"--gin.TRAIN_STEPS={steps}",
      "--gin.BATCH_SIZE=8", f'--gin.local_files.train="{root / "train.txt"}"',
      f'--gin.local_files.validation="{root / "validation.txt"}"',
      f'--gin.local_vocabulary_path.path="{vocab}"', "--gin.ModelConfig.vocab_size=256",
      "--gin.ModelConfig.dropout_rate=0.1", "--gin.LoopConfig.log_period=1",
      "--gin.EvalConfig.period=1000", "--gin.CheckpointConfig.period=2",
      "--gin.make_optimizer.name='adam'", "--gin.rsqrt_schedule.warmup_steps=10",
  ]


def _cli(args, env=None, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
  return subprocess.Popen([sys.executable, "-m", "switch_jax.cli.main", "train", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                          **kw)


def _final_params(model_dir, step):
  config = model_format.load_config(Path(model_dir) / "checkpoints" / str(step))
  from switch_jax.model.param_count import abstract_params  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  target = nn.unbox(abstract_params(config))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        target)
  return model_format.load_params(Path(model_dir) / "checkpoints" / str(step), target)


def _kill_after_a_new_checkpoint(proc, checkpoints, rng):
  """SIGKILLs `proc` at a random moment after it wrote a checkpoint newer
  than any on disk when it started (so it resumed and trained on)."""
  existing = ([int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
              if checkpoints.is_dir() else [])
  target = max(existing, default=0) + int(rng.choice([2, 4]))
  deadline = time.monotonic() + 600
  while not (checkpoints / str(target)).is_dir():
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)
  time.sleep(float(rng.uniform(0.0, 0.3)))
  proc.send_signal(signal.SIGKILL)
  return proc.communicate()[0]


def test_killed_run_resumes_and_ends_bit_identical(corpus, tmp_path):
  steps = 12
  killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
  # The restarts load the first processes' compiled steps (the same programs).
  cache = xla_cache.env(tmp_path / "xla-cache")
  # An uninterrupted run, and one SIGKILLed twice at random moments.
  clean = _cli(_train_args(corpus, clean_dir, steps), env=cache)
  rng = np.random.default_rng()
  outputs = [_kill_after_a_new_checkpoint(_cli(_train_args(corpus, killed_dir, steps), env=cache),
                                          killed_dir / "checkpoints", rng) for _ in range(2)]
  clean_out = clean.communicate(timeout=600)[0]
  assert clean.returncode == 0, clean_out[-3000:]
  resumed = _cli(_train_args(corpus, killed_dir, steps), env=cache)
  out = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0, out[-3000:]
  resumed_at = [int(line.split()[-1]) for line in "".join(outputs[1:] + [out]).splitlines()
                if line.startswith("Resuming from")]
  assert len(resumed_at) == 2 and 2 <= resumed_at[0] < resumed_at[1], resumed_at
  # Each resume restored the data position saved with its checkpoint: none replayed the input.
  assert [line for line in "".join(outputs + [out]).splitlines() if "replaying" in line] == []
  assert (killed_dir / "checkpoints" / str(steps) / "data" / "process_00000-of-00001").is_file()
  # Same parameters as the run that was never interrupted, bit for bit.
  a, b = _final_params(killed_dir, steps), _final_params(clean_dir, steps)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Same metrics at every step any of the killed processes logged.
  clean_records = {r["step"]: r for r in run_logging.read_records(clean_dir)}
  assert sorted(clean_records) == list(range(1, steps + 1))
  killed_records = run_logging.read_records(killed_dir)
  assert killed_records[-1]["step"] == steps
  for record in killed_records:
    for name in ("loss", "accuracy", "grad_norm", "fraction_dropped"):
      assert record[name] == clean_records[record["step"]][name], (record["step"], name)
  assert "ModelConfig.num_experts = 4" in (clean_dir / "config.gin").read_text()


def test_missing_required_macro_fails_before_training(corpus, tmp_path):
  args = [a for a in _train_args(corpus, tmp_path / "run", 4) if "TRAIN_STEPS" not in a]
  proc = _cli(args)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 2
  assert "TRAIN_STEPS must be set" in out and "Traceback" not in out
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_finetune_converted_hf_checkpoint_on_mocked_superglue(corpus, tmp_path):
  import dataclasses  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  # The test extra has torch (a CPU wheel) only on Python 3.11.
  torch = pytest.importorskip("torch", reason="torch is in the test extra on Python 3.11 only")
  transformers = pytest.importorskip("transformers")
  SwitchTransformersConfig = transformers.SwitchTransformersConfig
  SwitchTransformersForConditionalGeneration = transformers.SwitchTransformersForConditionalGeneration
  from switch_jax.cli import main as cli  # pylint: disable=import-outside-toplevel

  _, vocab = corpus
  torch.manual_seed(0)
  hf = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(
      vocab_size=256, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2,
      num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
      num_experts=4, expert_capacity=64, router_jitter_noise=0.0, dropout_rate=0.0,
      relative_attention_num_buckets=8, relative_attention_max_distance=16,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
  hf.save_pretrained(tmp_path / "hf")
  assert cli.main(["convert", "--from", "hf", "--hf_dir", str(tmp_path / "hf"),
                   "--out", str(tmp_path / "ckpt")]) == 0
  config = model_format.load_config(tmp_path / "ckpt")
  bindings = [f"ModelConfig.{name} = {value!r}" for name, value in dataclasses.asdict(config).items()
              if name not in ("dropout_rate", "expert_dropout_rate")]
  bindings += [
      f'MODEL_DIR = "{tmp_path / "run"}"', 'MIXTURE_OR_TASK_NAME = "super_glue_rte_v102"',
      "TASK_FEATURE_LENGTHS = {'inputs': 48, 'targets': 8}", "TRAIN_STEPS = 4",
      "BATCH_SIZE = 8", f'INITIAL_CHECKPOINT_PATH = "{tmp_path / "ckpt"}"',
      f'c4_vocabulary_path.path = "{vocab}"', "EvalConfig.period = 4", "EvalConfig.steps = 2",
      "InferenceEvaluator.max_examples = 8", "InferenceEvaluator.batch_size = 8",
      "CheckpointConfig.async_save = False"]
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    gin_config.parse(["runs/finetune.gin", "mesh/cpu8.gin"], bindings)
    summary = gin.get_configurable("train")()
  assert summary["step"] == 4
  evaluation = summary["eval"]
  assert 0.0 <= evaluation["super_glue_rte_v102/accuracy"] <= 100.0
  assert np.isfinite(evaluation["cross_entropy"]) and evaluation["num_tokens"] > 0
  assert np.isfinite(summary["train"]["loss"])
  # Fine-tuning moved the converted weights, from a fresh optimizer.
  start = _final_params_from(tmp_path / "ckpt")
  end = _final_params(tmp_path / "run", 4)
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(end))]
  assert min(moved) > 0.0
  assert (tmp_path / "run" / "checkpoints" / "4").is_dir()


def _final_params_from(model_checkpoint):
  return model_format.load_model(model_checkpoint)[1]
