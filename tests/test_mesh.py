"""Expert parallelism on an emulated 8-device CPU mesh: the sharded model
equals the single-device one; the compiled step moves tokens, not weights."""

import functools
import json
import os
import re
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mesh_case
from switch_jax import partitioning
from switch_jax.model import losses
from switch_jax.training import train_step as ts
from switch_jax.errors import ConfigError
from switch_jax.model.encoder_decoder import EncoderDecoder

MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)]


@functools.lru_cache(maxsize=None)
def _single_device(router):
  model = EncoderDecoder(mesh_case.config(router))
  batch = mesh_case.batch()
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch["encoder_input_tokens"],
                                        batch["decoder_input_tokens"])["params"])
  value_and_grad = jax.jit(lambda p, b: jax.value_and_grad(losses.loss_fn, argnums=1, has_aux=True)(
      model, p, b, None))
  (loss, metrics), grads = value_and_grad(params, batch)
  return model, params, value_and_grad, loss, metrics, grads


@pytest.mark.parametrize("router", ["top1", "dropless"])
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_loss_and_gradients_equal_one_device(shape, router):
  model, params, value_and_grad, loss, metrics, grads = _single_device(router)
  if router == "top1":
    assert float(metrics["router/fraction_dropped"]) > 0.1  # the case exercises drops
  mesh = partitioning.make_mesh(shape)
  with jax.set_mesh(mesh):
    boxed = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), *[jnp.ones((8, 8), jnp.int32)] * 2)["params"])
    sharded_params = jax.device_put(params, partitioning.logical_to_sharding(boxed, mesh))
    batch = jax.device_put(mesh_case.batch(), partitioning.batch_sharding(mesh))
    (loss_s, metrics_s), grads_s = value_and_grad(sharded_params, batch)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  for name in ("router/aux_loss", "router/fraction_dropped", "router/expert_fraction",
               "router/z_loss", "accuracy"):
    np.testing.assert_allclose(metrics_s[name], metrics[name], rtol=1e-5, err_msg=name)
  for (path, g), g_s in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_s)):
    # A missing or doubled factor over 2, 4 or 8 shards fails this.
    np.testing.assert_allclose(np.asarray(g_s), g, rtol=1e-4, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


def _compiled_step(shape, **config):
  model = EncoderDecoder(mesh_case.config(**config))
  optimizer = optax.adam(1e-3)
  mesh = partitioning.make_mesh(shape)
  with jax.set_mesh(mesh):
    shardings = ts.state_shardings(model, optimizer, mesh, 8, (8, 8))
    state = ts.make_init(model, optimizer, mesh, shardings, 8, (8, 8))(jax.random.PRNGKey(0))
    step = ts.make_train_step(model, optimizer, mesh, shardings)
    batch = jax.device_put(mesh_case.batch(), partitioning.batch_sharding(mesh))
    lowered = step.lower(state, batch, jax.random.PRNGKey(0))
  return state, lowered.compile().as_text(), lowered.as_text()


def _collectives(hlo, op):
  """The result type of every `op` in optimized HLO text, e.g.
  'bf16[8,1,2,32]' (XLA:CPU splits all-to-alls into per-peer tuples: the
  first element's type is given)."""
  found = []
  for line in hlo.splitlines():
    if f" {op}(" in line:
      found.append(re.search(r"= \(?(\w+\[[\d,]*\])", line).group(1))
  return found


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_step_moves_tokens_with_all_to_all_and_never_gathers_expert_weights(shape):
  state, hlo, _ = _compiled_step(shape)
  # Two Switch layers (encoder, decoder), one all-to-all each way, forward
  # and backward: 8.
  assert len(_collectives(hlo, "all-to-all")) == 8
  expert_shapes = {f"f32[8,{a},{b}]" for a, b in ((32, 64), (64, 32))}
  gathered = set(_collectives(hlo, "all-gather"))
  assert not gathered & expert_shapes, gathered
  # Each device holds 1 / (expert shards) of every expert weight (and a
  # 1 / model slice of its hidden width).
  data, expert, model = shape
  for name in ("wi_0", "wi_1", "wo"):
    w = state.params["encoder"]["layers_1"]["mlp"]["experts"][name]
    assert w.addressable_shards[0].data.nbytes == w.nbytes // (expert * model)
    m = state.opt_state[0].mu["encoder"]["layers_1"]["mlp"]["experts"][name]
    assert m.addressable_shards[0].data.nbytes == m.nbytes // (expert * model)


def test_bfloat16_activations_cross_the_wire_in_bfloat16():
  # Checked in the program we hand to XLA: XLA:CPU itself upcasts bf16
  # collectives to f32, TPU and GPU backends keep them.
  _, _, stablehlo = _compiled_step((1, 8, 1), dtype="bfloat16")
  types = re.findall(r"all_to_all.*-> tensor<([\dx]+)x(\w+)>", stablehlo)
  assert len(types) == 8 and all(t[1] == "bf16" for t in types), types


def test_meshes_that_do_not_fit_fail_before_compiling():
  with pytest.raises(ConfigError, match="needs a multiple of 3 devices"):
    partitioning.resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(ConfigError, match="uses 4 devices but 8"):
    partitioning.resolve_mesh_shape((2, 2, 1), 8)
  assert partitioning.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  cfg = mesh_case.config()
  with pytest.raises(ConfigError, match="16 expert shards but the model has only 8"):
    partitioning.check_fits(cfg, (1, 16, 1))
  with pytest.raises(ConfigError, match="cannot be split evenly over 3"):
    partitioning.check_fits(cfg.replace(num_experts=8), (1, 3, 1))
  with pytest.raises(ConfigError, match="batch size 12 cannot be split over 8"):
    partitioning.check_fits(cfg, (2, 4, 1), global_batch_size=12)
  with pytest.raises(ConfigError, match="num_heads=2 is not divisible by the model axis"):
    partitioning.check_fits(cfg, (1, 1, 4))
  partitioning.check_fits(cfg, (2, 4, 1), global_batch_size=16)


def test_compact_kernel_is_refused_on_an_expert_mesh_not_swapped():
  # 'compact' packs the filled slots of experts on one device; 'auto' picks
  # 'looped' on an expert mesh instead (the mesh tests above run it).
  model = EncoderDecoder(mesh_case.config(dispatch="compact"))
  tokens = jnp.ones((8, 8), jnp.int32)
  with jax.set_mesh(partitioning.make_mesh((2, 4, 1))):
    with pytest.raises(ConfigError, match="dispatch 'compact' .* over 4 devices; use 'auto'"):
      jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
  port, out = str(_free_port()), str(tmp_path / "result.json")
  here = os.path.dirname(__file__)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
  procs = [subprocess.Popen([sys.executable, os.path.join(here, "multiprocess_worker.py"), str(i),
                             "2", port, out], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
  with open(out) as f:
    result = json.load(f)
  assert result["devices"] == 8 and result["processes"] == 2
  losses, checksum = mesh_case.run_train_steps((2, 4, 1), steps=2)
  np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
  np.testing.assert_allclose(result["checksum"], float(checksum), rtol=1e-5)
  assert losses[1] < losses[0]
