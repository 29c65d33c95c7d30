"""Adafactor with per-expert factoring, the schedules, and the optimizer
state on a mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from switch_jax import partitioning
from switch_jax.training import optimizers
from switch_jax.training import train_step as ts
from switch_jax.config import get_config
from switch_jax.errors import ConfigError
from switch_jax.model.encoder_decoder import EncoderDecoder
from switch_jax.training.optimizers import FactorRule

BATCH, LENGTH = 8, 8


def _run(opt, params, grads_per_step):
  """Applies `opt` to `params` for each gradient tree; returns the updates
  of every step, the final params and state."""
  state = opt.init(params)
  update = jax.jit(opt.update)
  history = []
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(updates)
  return history, params, state


def _random_grads(params, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * rng.uniform(0.1, 3.0),
                                             jnp.float32), params) for _ in range(steps)]


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-9):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("momentum,weight_decay", [(None, None), (0.9, 1e-2)])
def test_dense_tree_matches_optax_adafactor(momentum, weight_decay):
  # On matrices and vectors optax's two-largest-dims rule and ours coincide,
  # and optax.adafactor has t5x's semantics (decay 1 - (t+1)^-0.8, RMS
  # clipping, relative steps with a 1e-3 floor); a short flat phase in the
  # schedule checks both count updates from 0.
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(128, 256)), "small": rng.normal(size=(16, 32)),
            "scale": rng.uniform(0.5, 2.0, size=(256,)), "zero_bias": np.zeros(64)}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  schedule = optimizers.rsqrt_schedule(base=0.1, warmup_steps=3)
  rules = optimizers.factor_rules(params)
  assert rules == {"w": FactorRule((), (0,), (1,)), "small": FactorRule(),
                   "scale": FactorRule(), "zero_bias": FactorRule()}
  ours = optimizers.adafactor(schedule, factor_rules=rules, momentum=momentum,
                              weight_decay_rate=weight_decay)
  reference = optax.adafactor(schedule, decay_rate=0.8, eps=1e-30, clipping_threshold=1.0,
                              multiply_by_parameter_scale=True, momentum=momentum,
                              weight_decay_rate=weight_decay)
  grads = _random_grads(params, 6)
  got, got_params, state = _run(ours, params, grads)
  want, want_params, ref_state = _run(reference, params, grads)
  for u, v in zip(got, want):
    _assert_trees_close(u, v)
  _assert_trees_close(got_params, want_params)
  # Statistics keep the reduced axis with size 1 (so they shard like w).
  assert state.v_row["w"].shape == (128, 1) and state.v_col["w"].shape == (1, 256)
  _assert_trees_close(state.v_row["w"][:, 0], ref_state[0].v_row["w"])
  assert int(state.count) == 6
  # A zero vector still moves: its first step is lr(0) * epsilon2 per weight
  # (u = g / |g| = +-1), times 1 - beta1 with momentum.
  first_step = 0.1 / np.sqrt(3) * 1e-3 * (1.0 - (momentum or 0.0))
  np.testing.assert_allclose(np.abs(got[0]["zero_bias"]), first_step, rtol=1e-5)


def test_attention_kernel_is_factored_as_the_matrix_d_by_heads_times_head_dim():
  rng = np.random.default_rng(2)
  kernel = jnp.asarray(rng.normal(size=(32, 4, 16)), jnp.float32)
  rules = optimizers.factor_rules({"k": kernel}, {"k": P("embed", "heads", "kv")})
  assert rules["k"] == FactorRule((), (0,), (1, 2))
  grads = _random_grads({"k": kernel}, 4)
  got, _, state = _run(optimizers.adafactor(1e-2, factor_rules=rules), {"k": kernel}, grads)
  assert state.v_row["k"].shape == (32, 1, 1) and state.v_col["k"].shape == (1, 4, 16)
  flat = lambda t: {"k": t["k"].reshape(32, 64)}
  want, _, _ = _run(optax.adafactor(1e-2, min_dim_size_to_factor=1), flat({"k": kernel}),
                    [flat(g) for g in grads])
  for u, v in zip(got, want):
    _assert_trees_close(flat(u), v)


def test_expert_axis_is_a_batch_axis():
  # E = 256 is the largest dim: a two-largest-dims rule would factor over it.
  e, d, f = 256, 8, 16
  rng = np.random.default_rng(3)
  # Experts whose weights and gradients differ in scale by up to 10^4, so
  # any statistic shared across experts shows.
  expert_scale = 10.0 ** rng.integers(-2, 3, size=(e, 1, 1))
  params = {"wi": jnp.asarray(rng.normal(size=(e, d, f)) * expert_scale, jnp.float32)}
  grads = [{"wi": g["wi"] * jnp.asarray(expert_scale[::-1], jnp.float32)}
           for g in _random_grads(params, 4, seed=4)]
  rules = optimizers.factor_rules(params, {"wi": P("expert", "embed", "mlp")})
  assert rules["wi"] == FactorRule((0,), (1,), (2,))
  got, got_params, state = _run(optimizers.adafactor(1e-2, factor_rules=rules), params, grads)
  assert state.v_row["wi"].shape == (e, d, 1) and state.v_col["wi"].shape == (e, 1, f)

  # The reference: an independent 2-D Adafactor per expert (optax on [d, f],
  # factored), vmapped over experts.
  per_expert = optax.adafactor(1e-2, min_dim_size_to_factor=1)
  ref_state = jax.vmap(per_expert.init)(params["wi"])
  ref_params = params["wi"]
  update = jax.jit(jax.vmap(per_expert.update))
  for step, g in enumerate(grads):
    u, ref_state = update(g["wi"], ref_state, ref_params)
    ref_params = ref_params + u
    np.testing.assert_allclose(got[step]["wi"], u, rtol=2e-5, atol=1e-12)
  np.testing.assert_allclose(state.v_row["wi"][..., 0], ref_state[0].v_row, rtol=1e-5)
  np.testing.assert_allclose(state.v_col["wi"][:, 0], ref_state[0].v_col, rtol=1e-5)

  # optax's own rule on the 3-D weight averages over experts: different.
  pooled, _, pooled_state = _run(optax.adafactor(1e-2, min_dim_size_to_factor=1), params, grads)
  assert pooled_state[0].v_col["wi"].shape == (e, d)  # its row dim is f, its column dim E
  assert not np.allclose(pooled[-1]["wi"], got[-1]["wi"], rtol=0.1)


def test_schedules():
  rsqrt = optimizers.rsqrt_schedule()
  np.testing.assert_allclose([float(rsqrt(s)) for s in (0, 1, 9999, 10000, 40000)],
                             [0.01, 0.01, 0.01, 0.01, 0.005], rtol=1e-6)
  assert float(optimizers.constant(1e-3)(123456)) == pytest.approx(1e-3)
  cosine = optimizers.warmup_decay(1.0, 10, 110)
  linear = optimizers.warmup_decay(1.0, 10, 110, decay="linear", end_value=0.1)
  np.testing.assert_allclose([float(cosine(s)) for s in (0, 5, 10, 60, 110, 200)],
                             [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose([float(linear(s)) for s in (5, 10, 60, 110)],
                             [0.5, 1.0, 0.55, 0.1], atol=1e-6)


def _model_and_boxed():
  model = EncoderDecoder(get_config("tiny_switch"))
  enc = jnp.ones((BATCH, LENGTH), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, enc)["params"])
  return model, boxed


def test_factor_rules_of_the_switch_model():
  _, boxed = _model_and_boxed()
  rules = optimizers.factor_rules(boxed)
  layer = rules["encoder"]["layers_1"]
  assert layer["attention"]["query"] == FactorRule((), (0,), (1, 2))
  assert layer["attention"]["out"] == FactorRule((), (2,), (0, 1))
  assert layer["mlp"]["experts"]["wi_0"] == FactorRule((0,), (1,), (2,))
  assert layer["mlp"]["experts"]["wo"] == FactorRule((0,), (2,), (1,))
  # Matrices under 128 and vectors stay unfactored.
  for rule in (layer["mlp"]["router"]["kernel"], layer["pre_mlp_layer_norm"]["scale"],
               rules["token_embedder"]["embedding"], rules["encoder"]["layers_0"]["mlp"]["wo"],
               rules["encoder"]["relpos_bias"]["rel_embedding"]):
    assert rule == FactorRule()
  assert optimizers.factor_rules({"w": jnp.zeros((128, 256))})["w"].factored
  with pytest.raises(ConfigError, match="needs logical axis names"):
    optimizers.factor_rules({"w": jnp.zeros((4, 8, 8))})
  with pytest.raises(ConfigError, match="no Adafactor role"):
    optimizers.factor_rules({"w": jnp.zeros((4, 8))}, {"w": P("expert", "nope")})
  with pytest.raises(ConfigError, match="different parameter tree"):
    optimizers.adafactor(1e-2, factor_rules=rules).init({"w": jnp.zeros(3)})
  with pytest.raises(ConfigError, match="needs boxed_params"):
    optimizers.make_optimizer("adafactor", 1e-2)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tgt = rng.integers(2, 128, (BATCH, LENGTH)).astype(np.int32)
  dec = np.concatenate([np.zeros((BATCH, 1), np.int32), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": rng.integers(2, 128, (BATCH, LENGTH)).astype(np.int32),
          "decoder_input_tokens": dec, "decoder_target_tokens": tgt}


@functools.lru_cache(maxsize=None)
def _trained(steps=30):
  """The tiny Switch model trained by single-device Adafactor on one batch:
  the losses, the state after the first step and after the last."""
  model, boxed = _model_and_boxed()
  optimizer = optimizers.make_optimizer("adafactor", optimizers.rsqrt_schedule(),
                                        boxed_params=boxed, grad_clip_norm=1.0)
  state = jax.jit(ts.init_fn(model, optimizer, BATCH, (LENGTH, LENGTH)))(jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(ts.train_step, model=model, optimizer=optimizer))
  losses, states = [], []
  for _ in range(steps):
    state, metrics = step(state, _batch(), jax.random.PRNGKey(1))
    losses.append(float(metrics["loss"]))
    states.append(state)
  return losses, states[0], states[-1]


def test_adafactor_trains_the_tiny_switch_model():
  losses, _, state = _trained()
  # Measured: 6.026 -> 3.510 at lr 1e-2 (the rsqrt schedule's flat phase),
  # falling every step.
  assert losses[0] == pytest.approx(6.026, abs=0.02)
  assert losses[-1] < 3.6, losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  adafactor_state = state.opt_state[-1]
  assert int(adafactor_state.count) == 30 and int(state.step) == 30
  assert adafactor_state.v_row["encoder"]["layers_1"]["mlp"]["experts"]["wi_0"].shape == (4, 32, 1)


def test_factored_expert_statistics_are_sharded_over_experts():
  model, boxed = _model_and_boxed()
  optimizer = optimizers.make_optimizer("adafactor", optimizers.rsqrt_schedule(),
                                        boxed_params=boxed, grad_clip_norm=1.0)
  mesh = partitioning.make_mesh((1, 4, 2))
  with jax.set_mesh(mesh):
    shardings = ts.state_shardings(model, optimizer, mesh, BATCH, (LENGTH, LENGTH))
    state = ts.make_init(model, optimizer, mesh, shardings, BATCH, (LENGTH, LENGTH))(
        jax.random.PRNGKey(0))
    step = ts.make_train_step(model, optimizer, mesh, shardings)
    batch = jax.device_put(_batch(), partitioning.batch_sharding(mesh))
    state, _ = step(state, batch, jax.random.PRNGKey(1))
  opt_state = state.opt_state[-1]
  experts = lambda tree: tree["decoder"]["layers_1"]["mlp"]["experts"]
  # wi_0 [E, d, f] is (expert, embed, mlp), wo [E, f, d] is (expert, mlp, embed):
  # each statistic keeps its parameter's spec on the axes it keeps.
  cases = (("wi_0", (4, 32, 1), (4, 1, 64), P("expert", None, None), P("expert", None, "model")),
           ("wo", (4, 1, 32), (4, 64, 1), P("expert", None, None), P("expert", "model", None)))
  for name, row_shape, col_shape, row_spec, col_spec in cases:
    v_row, v_col = experts(opt_state.v_row)[name], experts(opt_state.v_col)[name]
    assert (v_row.shape, v_col.shape) == (row_shape, col_shape)
    assert v_row.sharding.spec == row_spec and v_col.sharding.spec == col_spec
    # Each device holds one expert's statistics (and half its columns).
    assert v_row.addressable_shards[0].data.size == 32
    assert v_col.addressable_shards[0].data.size == 32
  attention = opt_state.v_col["encoder"]["layers_0"]["attention"]["query"]
  assert attention.shape == (1, 2, 16) and attention.sharding.spec == P(None, "model", None)
  # The sharded step is the single-device step.
  _, one_device, _ = _trained()
  _assert_trees_close(jax.device_get(state.params), one_device.params, rtol=1e-4, atol=1e-6)
  _assert_trees_close(jax.device_get(opt_state.v_row), one_device.opt_state[-1].v_row,
                      rtol=1e-4, atol=1e-12)
