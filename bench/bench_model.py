"""Whole train steps: Switch vs its FLOP-matched dense model, and compile times.

The step is the trainer's own (`train_step.make_train_step`: loss, grads,
Adafactor update, donated state) on a one-device mesh. Model FLOPs are
analytic.forward_flops x 3 (forward + backward) of the *dense* model plus
the Switch model's routers: the useful work, so capacity slack and padding
count against the Switch model's utilization, not for it. The hardware
FLOPs (every capacity slot, as planning counts them) are reported beside.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import bench_timer
from switch_jax import partitioning
from switch_jax.planning import analytic
from switch_jax.training import train_step as ts
from switch_jax.config import ModelConfig, get_config
from switch_jax.model.encoder_decoder import EncoderDecoder
from switch_jax.training.optimizers import make_optimizer

# Base widths (d 768, d_ff 2048 GeGLU, 12 heads of 64, vocab 32128) with
# 2 + 2 layers, so a step fits a CPU: the layer-1 FFN of each stack is a
# Switch layer in the sparse model.
BASE_SMALL = dict(num_encoder_layers=2, num_decoder_layers=2)


def small_configs(num_experts: int, dtype: str) -> tuple[ModelConfig, ModelConfig]:
  dense = get_config("t5_base", dtype=dtype, **BASE_SMALL)
  return dense, get_config("switch_base", num_experts=num_experts, dtype=dtype, **BASE_SMALL)


def model_flops(config: ModelConfig, batch: int, lengths: tuple[int, int]) -> dict:
  """Forward+backward FLOPs of one step: 'model' (useful) and 'hardware'."""
  dense = config.replace(num_experts=0)
  flops = analytic.forward_flops(config, batch, *lengths)
  useful = sum(analytic.forward_flops(dense, batch, *lengths).values()) + flops["router"]
  return {"model": 3 * useful, "hardware": 3 * sum(flops.values())}


def _step(config: ModelConfig, batch: int, lengths: tuple[int, int], abstract: bool):
  """The jitted train step, its state and batch (abstract: shapes only)."""
  model = EncoderDecoder(config)
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  with jax.set_mesh(mesh):
    boxed = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.ones((1, lengths[0]), jnp.int32),
        jnp.ones((1, lengths[1]), jnp.int32))["params"])
    optimizer = make_optimizer("adafactor", 1e-3, boxed_params=boxed)
    shardings = ts.state_shardings(model, optimizer, mesh, batch, lengths)
    step = ts.make_train_step(model, optimizer, mesh, shardings)
    if not abstract:
      state = ts.make_init(model, optimizer, mesh, shardings, batch, lengths)(
          jax.random.PRNGKey(0))
  if abstract:  # the step's in_shardings place it; make_init sets its own mesh
    state = jax.eval_shape(ts.init_fn(model, optimizer, batch, lengths), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = {"encoder_input_tokens": rng.integers(2, config.vocab_size, (batch, lengths[0])),
            "decoder_target_tokens": rng.integers(2, config.vocab_size, (batch, lengths[1]))}
  tokens["decoder_input_tokens"] = np.concatenate(
      [np.zeros((batch, 1), np.int64), tokens["decoder_target_tokens"][:, :-1]], axis=1)
  batch_arrays = {k: jnp.asarray(v, jnp.int32) for k, v in tokens.items()}
  return mesh, step, state, batch_arrays


def compile_seconds(config: ModelConfig, batch: int, lengths: tuple[int, int]) -> dict:
  """Trace + lower and XLA compile times of the train step, from shapes only."""
  mesh, step, state, batch_arrays = _step(config, batch, lengths, abstract=True)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    lowered = step.lower(state, batch_arrays, jax.random.PRNGKey(0))
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
  return {"lower_s": lower_s, "compile_s": compile_s}


class _Runner:
  """Steps a train state in place (the step donates it)."""

  def __init__(self, config, batch, lengths):
    self.mesh, self.step, self.state, self.batch = _step(config, batch, lengths, False)
    with jax.set_mesh(self.mesh):
      start = time.perf_counter()
      self.compiled = self.step.lower(self.state, self.batch, jax.random.PRNGKey(0)).compile()
      self.compile_s = time.perf_counter() - start

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch, jax.random.PRNGKey(0))
    return metrics["loss"]


def train_steps(num_experts: int, dtype: str, batch: int, lengths: tuple[int, int],
                rounds: int, budget_s: float) -> dict:
  """Switch vs dense train steps: tokens/s and utilization of the float32
  matmul peak, every matmul shape of bench_timer.PEAK_SHAPES timed in
  alternation with the steps (so load from other jobs slows both)."""
  dense_cfg, switch_cfg = small_configs(num_experts, dtype)
  runners = {"dense": _Runner(dense_cfg, batch, lengths),
             "switch": _Runner(switch_cfg, batch, lengths)}
  shape_flops = {}
  for shape in bench_timer.PEAK_SHAPES:
    runners[shape], shape_flops[shape] = bench_timer.matmul(*shape)
  best = bench_timer.interleaved(runners, rounds, budget_s)
  peak_gflops = max(shape_flops[s] / best[s] / 1e9 for s in shape_flops)
  tokens = batch * (lengths[0] + lengths[1])
  out = {"num_experts": num_experts, "dtype": dtype, "batch": batch, "lengths": list(lengths),
         "peak_gflops": peak_gflops, "step_ratio": best["switch"] / best["dense"]}
  for name, config in (("dense", dense_cfg), ("switch", switch_cfg)):
    flops = model_flops(config, batch, lengths)
    params = sum(x.size for x in jax.tree.leaves(nn.unbox(runners[name].state.params)))
    out[name] = {"seconds": best[name], "tokens_per_s": tokens / best[name],
                 "model_tflops_per_step": flops["model"] / 1e12,
                 "mfu": flops["model"] / best[name] / 1e9 / peak_gflops,
                 "hardware_fu": flops["hardware"] / best[name] / 1e9 / peak_gflops,
                 "parameters": int(params), "compile_s": runners[name].compile_s}
  return out
