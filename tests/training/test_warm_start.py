"""Sparse upcycling, initializing a student from a teacher, and distillation."""

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from switch_jax import run_logging
from switch_jax.cli import gin_config
from switch_jax.model import losses
from switch_jax.checkpoints import model_format
from switch_jax.training import warm_start
from switch_jax.config import get_config
from switch_jax.errors import ConfigError
from switch_jax.model.encoder_decoder import EncoderDecoder


def _init(name, seed=0, **overrides):
  model = EncoderDecoder(get_config(name, **overrides))
  tokens = jnp.ones((1, 8), jnp.int32)
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), tokens, tokens)["params"])


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def dense_and_switch():
  return _init("tiny_dense", seed=1), _init("tiny_switch", seed=2)


def test_upcycled_experts_are_copies_of_the_dense_ffn(dense_and_switch):
  dense, fresh = dense_and_switch
  up = _flat(warm_start.upcycle(dense, fresh))
  d, f = _flat(dense), _flat(fresh)
  for stack in ("encoder", "decoder"):
    for name in ("wi_0", "wi_1", "wo"):
      experts = up[f"{stack}/layers_1/mlp/experts/{name}"]
      assert experts.shape[0] == 4
      for e in range(4):
        np.testing.assert_array_equal(experts[e], d[f"{stack}/layers_1/mlp/{name}"])
    np.testing.assert_array_equal(up[f"{stack}/layers_1/mlp/router/kernel"],
                                  f[f"{stack}/layers_1/mlp/router/kernel"])  # fresh
  for path, value in d.items():
    if path in up:
      np.testing.assert_array_equal(up[path], value)
  assert set(up) == set(f)


def test_upcycling_needs_a_dense_model_of_the_same_shape(dense_and_switch):
  _, fresh = dense_and_switch
  with pytest.raises(ConfigError, match="cannot upcycle"):
    warm_start.upcycle(_init("tiny_dense", d_ff=48), fresh)


def test_student_takes_every_matching_teacher_weight(dense_and_switch):
  student_fresh, teacher = dense_and_switch
  student, copied = warm_start.copy_matching(teacher, student_fresh)
  s, t, fresh = _flat(student), _flat(teacher), _flat(student_fresh)
  # The student's dense FFN where the teacher has experts keeps its own init.
  kept = sorted(set(s) - set(copied))
  assert kept == [f"{stack}/layers_1/mlp/{n}" for stack in ("decoder", "encoder")
                  for n in ("wi_0", "wi_1", "wo")]
  for path in copied:
    np.testing.assert_array_equal(s[path], t[path])
  for path in kept:
    np.testing.assert_array_equal(s[path], fresh[path])


def test_distillation_loss_mixes_hard_and_soft_targets():
  cfg = get_config("tiny_dense")
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 5, 11)) * 2, jnp.float32)
  targets = jnp.asarray(rng.integers(1, 11, size=(2, 5)), jnp.int32).at[1, 3:].set(0)
  batch = {"decoder_target_tokens": targets}
  plain, m = losses.total_loss(cfg, logits, batch, z_loss=0.0)
  same, _ = losses.total_loss(cfg, logits, batch, z_loss=0.0, teacher_logits=teacher,
                              teacher_weight=0.0)
  np.testing.assert_allclose(same, plain, rtol=1e-6)
  mixed, mm = losses.total_loss(cfg, logits, batch, z_loss=0.0, teacher_logits=teacher,
                                teacher_weight=0.25)
  w = np.asarray(targets > 0, np.float32)
  p_t = np.asarray(jax.nn.softmax(teacher))
  log_p = np.asarray(jax.nn.log_softmax(logits))
  soft = (-(p_t * log_p).sum(-1) * w).sum() / w.sum()
  np.testing.assert_allclose(mm["teacher_cross_entropy"], soft, rtol=1e-5)
  np.testing.assert_allclose(mixed, 0.75 * m["cross_entropy"] + 0.25 * soft, rtol=1e-5)


def _run(corpus, model_dir, model_file, run_file, **extra):
  root, vocab = corpus
  bindings = {
      "MODEL_DIR": f'"{model_dir}"', "MIXTURE_OR_TASK_NAME": '"local_span_corruption"',
      "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 8}", "TRAIN_STEPS": "3",
      "BATCH_SIZE": "8", "local_files.train": f'"{root / "train.txt"}"',
      "local_files.validation": f'"{root / "validation.txt"}"',
      "local_vocabulary_path.path": f'"{vocab}"', "ModelConfig.vocab_size": "256",
      "LoopConfig.log_period": "1", "EvalConfig.period": "1000", "CheckpointConfig.period": "3",
      "CheckpointConfig.async_save": "False", "make_optimizer.name": "'adam'"}
  bindings.update(extra)
  gin_config.parse([model_file, run_file, "mesh/cpu8.gin"],
                   [f"{k} = {v}" for k, v in bindings.items()])
  return gin.get_configurable("train")()


def test_upcycle_then_distill_back_into_a_dense_student(corpus, tmp_path, capsys):
  _run(corpus, tmp_path / "dense", "models/tiny_dense.gin", "runs/pretrain.gin")
  # A Switch model upcycled from the dense run: before any step its experts
  # are the dense FFNs (checked through the restored step-3 checkpoint here
  # being reachable and the run finishing), then it trains on.
  summary = _run(corpus, tmp_path / "switch", "models/tiny_switch.gin", "runs/upcycle.gin",
                 INITIAL_CHECKPOINT_PATH=f'"{tmp_path / "dense"}"')
  assert summary["step"] == 3 and "initialized from" in capsys.readouterr().out.lower()
  # Distill the Switch model into a dense student initialized from it.
  summary = _run(corpus, tmp_path / "student", "models/tiny_dense.gin", "runs/distill.gin",
                 TEACHER_CHECKPOINT_PATH=f'"{tmp_path / "switch"}"')
  out = capsys.readouterr().out
  assert "Initialized " in out and "parameters from" in out
  records = run_logging.read_records(tmp_path / "student")
  assert len(records) == 3
  for r in records:
    assert np.isfinite(r["loss"]) and np.isfinite(r["teacher_cross_entropy"])
  assert model_format.load_config(tmp_path / "student").num_experts == 0
