"""The Switch layer: every fast dispatch path equals the plain reference,
forward and gradients, with and without dropped tokens."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_jax.config import DISPATCHES, get_config
from switch_jax.errors import ConfigError
from switch_jax import partitioning
from switch_jax.model.moe import cpu_kernels, dispatch, kernels
from switch_jax.model.moe import switch_layer
from switch_jax.model.moe.switch_layer import SwitchLayer, auto_dispatch

B, L, D = 2, 16, 32


def _config(router, **kw):
  base = dict(num_experts=4, group_size=8, train_capacity_factor=1.0, eval_capacity_factor=1.0,
              min_expert_capacity=1, router=router, decoder_router="top1")
  base.update(kw)
  return get_config("tiny_switch", **base)


def _inputs(seed=1):
  x = jax.random.normal(jax.random.PRNGKey(seed), (B, L, D))
  valid = jnp.ones((B, L), bool).at[1, 12:].set(False)
  return x, valid


@functools.lru_cache(maxsize=None)
def _runner(config, router):
  layer = SwitchLayer(config, router)

  def forward(params, x, valid):
    y, state = layer.apply({"params": params}, x, valid, mutable=["moe"])
    return y, jax.tree.map(lambda v: v[0], state["moe"], is_leaf=lambda v: isinstance(v, tuple))

  def objective(params, x, valid):
    y, stats = forward(params, x, valid)
    return jnp.sum(jnp.sin(y)) + stats["aux_loss"] + stats["z_loss"]

  return layer, jax.jit(forward), jax.jit(jax.grad(objective, argnums=(0, 1)))


# 'auto' is each router's fastest path on this backend (on CPU: 'compact'
# for top-1 and top-2, 'looped' for expert choice, 'bucketed' for
# dropless); the others are named.
CASES = [
    ("top1", dict()), ("top1", dict(batch_prioritized_routing=True)),
    ("top1", dict(ffn_activation="relu")), ("top2", dict()),
    ("expert_choice", dict()), ("dropless", dict()), ("dropless", dict(ffn_activation="relu")),
    ("top1", dict(dispatch="gather")), ("top2", dict(dispatch="gather")),
    ("top1", dict(dispatch="looped")), ("top2", dict(dispatch="looped")),
    ("dropless", dict(dispatch="ragged")),
    ("dropless", dict(dispatch="ragged", ffn_activation="relu")),
]


@pytest.mark.parametrize("router,kw", CASES)
def test_fast_path_equals_reference(router, kw):
  fast_cfg = _config(router, **kw)
  ref_cfg = fast_cfg.replace(dispatch="reference")
  layer, fast, fast_grad = _runner(fast_cfg, router)
  _, ref, ref_grad = _runner(ref_cfg, router)
  x, valid = _inputs()
  params = layer.init(jax.random.PRNGKey(0), x, valid)["params"]
  y_fast, stats_fast = fast(params, x, valid)
  y_ref, stats_ref = ref(params, x, valid)
  np.testing.assert_allclose(y_fast, y_ref, atol=1e-5, rtol=1e-5)
  for name in stats_ref:
    np.testing.assert_allclose(stats_fast[name], stats_ref[name], atol=1e-6, err_msg=name)
  if router != "dropless":  # capacity 1.0 with 4 experts and 8-token groups drops tokens
    assert float(stats_fast["fraction_dropped"]) > 0.05
  g_fast, g_ref = fast_grad(params, x, valid), ref_grad(params, x, valid)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  # The router learns from the task loss through the gate.
  assert float(jnp.abs(nn.unbox(g_fast[0])["router"]["kernel"]).max()) > 1e-4


def test_bfloat16_fast_path_tracks_reference():
  cfg = _config("top1", dtype="bfloat16")
  layer, fast, _ = _runner(cfg, "top1")
  _, ref, _ = _runner(cfg.replace(dispatch="reference"), "top1")
  x, valid = _inputs()
  params = layer.init(jax.random.PRNGKey(0), x, valid)["params"]
  y_fast, _ = fast(params, x, valid)
  y_ref, _ = ref(params, x, valid)
  assert y_fast.dtype == jnp.bfloat16
  np.testing.assert_allclose(y_fast.astype(np.float32), y_ref.astype(np.float32), atol=2e-2)


def test_dropped_tokens_output_zero_and_kept_tokens_are_gate_times_expert():
  cfg = _config("top1")
  layer, fast, _ = _runner(cfg, "top1")
  x, valid = _inputs()
  variables = layer.init(jax.random.PRNGKey(0), x, valid)
  params = nn.unbox(variables["params"])
  y, _ = fast(variables["params"], x, valid)
  xg = np.asarray(x).reshape(4, 8, D)
  logits = np.einsum("gsd,de->gse", xg, params["router"]["kernel"])
  probs = np.asarray(jax.nn.softmax(logits))
  choice = probs.argmax(-1)
  yg = np.asarray(y).reshape(4, 8, D)
  vg = np.asarray(valid).reshape(4, 8)
  w = params["experts"]
  dropped = 0
  for g in range(4):
    counts = np.zeros(4, int)
    for s in range(8):
      e = choice[g, s]
      if not vg[g, s] or counts[e] >= 2:  # capacity round(1.0 * 8 / 4) = 2
        np.testing.assert_array_equal(yg[g, s], 0.0)
        dropped += vg[g, s]
        continue
      counts[e] += 1
      h = jax.nn.gelu(xg[g, s] @ w["wi_0"][e], approximate=True) * (xg[g, s] @ w["wi_1"][e])
      np.testing.assert_allclose(yg[g, s], probs[g, s, e] * (h @ w["wo"][e]), atol=1e-5)
  assert dropped > 0


def test_groups_route_independently():
  # Capacity is per group: routing 2 groups of 8 equals routing each alone.
  cfg = _config("top1")
  layer, fast, _ = _runner(cfg, "top1")
  x, valid = _inputs()
  params = layer.init(jax.random.PRNGKey(0), x, valid)["params"]
  y, _ = fast(params, x, valid)
  y0, _ = fast(params, x[:1], valid[:1])
  np.testing.assert_allclose(y[:1], y0, atol=1e-6)


def test_group_layout():
  layout = switch_layer.group_layout
  assert layout(4096, 8192) == (1, 4096)
  assert layout(16384, 4096) == (4, 4096)
  assert layout(4096, 1000) == (8, 512)  # 5 groups do not divide 4096 tokens; 8 do
  assert layout(64, 8192, multiple_of=8) == (8, 8)  # one group per batch shard at least
  # A prime count has no even split near 2 groups: pad 1 token, not 1031 groups of 1.
  assert layout(1031, 1024) == (2, 516)
  assert layout(8 * 13, 4, multiple_of=8) == (32, 4)  # each shard pads 13 tokens to 16
  with pytest.raises(ConfigError, match="batch shards"):
    layout(60, 8, multiple_of=8)


def test_prime_token_count_pads_to_whole_groups():
  # 1031 tokens with groups of at most 1024 route as 2 groups of 516 (the
  # last token padding), so capacity binds: exactly what the same layer
  # gives on the input padded by hand with an invalid token.
  cfg = _config("top1", group_size=1024)
  layer, fast, _ = _runner(cfg, "top1")
  _, ref, _ = _runner(cfg.replace(dispatch="reference"), "top1")
  x = jax.random.normal(jax.random.PRNGKey(7), (1, 1031, D))
  valid = jnp.ones((1, 1031), bool)
  params = layer.init(jax.random.PRNGKey(0), x[:, :8], valid[:, :8])["params"]
  y, stats = fast(params, x, valid)
  y_ref, stats_ref = ref(params, x, valid)
  y_pad, stats_pad = fast(params, jnp.pad(x, ((0, 0), (0, 1), (0, 0))),
                          jnp.pad(valid, ((0, 0), (0, 1))))
  assert y.shape == (1, 1031, D)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y, y_pad[:, :1031], atol=1e-6)
  for name in stats_ref:
    np.testing.assert_allclose(stats[name], stats_ref[name], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(stats[name], stats_pad[name], atol=1e-6, err_msg=name)
  # Capacity round(1.0 * 516 / 4) = 129 binds on a random router; 1031
  # one-token groups (capacity 1 each) would drop nothing.
  assert float(stats["fraction_dropped"]) > 0.05


def test_padded_groups_under_a_mesh_equal_one_device():
  # 8 sequences of 13 tokens over 8 batch shards (data 2 x expert 4), groups
  # of at most 4: each shard pads its own 13 tokens to 4 groups of 4. One
  # device routing the rows padded by hand to 16 sees the same groups.
  # Row 6 is all padding: its shard's groups must not count in the aux loss.
  cfg = _config("top1", group_size=4, num_experts=8)
  layer, fast, _ = _runner(cfg, "top1")
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 13, D))
  valid = jnp.ones((8, 13), bool).at[6].set(False).at[2, 9:].set(False)
  params = layer.init(jax.random.PRNGKey(0), x, valid)["params"]
  y_one, stats_one = fast(params, jnp.pad(x, ((0, 0), (0, 3), (0, 0))),
                          jnp.pad(valid, ((0, 0), (0, 3))))
  mesh = partitioning.make_mesh((2, 4, 1))
  with jax.set_mesh(mesh):
    sharded = jax.device_put((x, valid), partitioning.batch_sharding(mesh))
    y_mesh, stats_mesh = fast(jax.device_put(params, partitioning.replicated(mesh)), *sharded)
  np.testing.assert_allclose(y_mesh, y_one[:, :13], atol=1e-5, rtol=1e-5)
  for name in ("aux_loss", "fraction_dropped", "expert_fraction", "z_loss"):
    np.testing.assert_allclose(stats_mesh[name], stats_one[name], rtol=1e-5, err_msg=name)
  assert float(stats_mesh["fraction_dropped"]) > 0.05  # capacity 1 of 4 tokens binds


@pytest.mark.parametrize("router,kw", [("top1", dict()), ("top1", dict(dispatch="reference")),
                                       ("dropless", dict())])
def test_all_padding_groups_do_not_count_in_the_aux_loss(router, kw):
  # One group per sequence; the third sequence is all padding (an eval
  # batch's filler row). The aux loss is the mean over the two real groups.
  cfg = _config(router, group_size=None, **kw)
  layer, fast, _ = _runner(cfg, router)
  x = jax.random.normal(jax.random.PRNGKey(2), (3, L, D))
  valid = jnp.ones((3, L), bool).at[1, 10:].set(False).at[2].set(False)
  params = layer.init(jax.random.PRNGKey(0), x, valid)["params"]
  _, stats = fast(params, x, valid)
  _, stats_real = fast(params, x[:2], valid[:2])
  np.testing.assert_allclose(stats["aux_loss"], stats_real["aux_loss"], rtol=1e-6)
  assert float(stats_real["aux_loss"]) > 0.9  # about 1 at balance, so 2/3 of it would fail


def test_jitter_only_in_training():
  cfg = _config("top1", jitter_noise=0.5)
  layer = SwitchLayer(cfg, "top1")
  x, valid = _inputs()
  params = layer.init(jax.random.PRNGKey(0), x, valid)["params"]
  eval_a = layer.apply({"params": params}, x, valid)
  eval_b = layer.apply({"params": params}, x, valid, rngs={"dropout": jax.random.PRNGKey(5)})
  np.testing.assert_array_equal(eval_a, eval_b)
  train = [layer.apply({"params": params}, x, valid, deterministic=False,
                       rngs={"dropout": jax.random.PRNGKey(s)}) for s in (1, 2)]
  assert not np.allclose(train[0], train[1])


def test_train_and_eval_capacity_factors():
  cfg = _config("top1", train_capacity_factor=0.5, eval_capacity_factor=2.0)
  layer = SwitchLayer(cfg, "top1")
  assert layer.capacity(64, deterministic=False) == 8
  assert layer.capacity(64, deterministic=True) == 32
  assert SwitchLayer(cfg.replace(expert_capacity=3), "top1").capacity(64, True) == 3


def test_top2_capacity_counts_slots_per_token_not_per_choice():
  # C = round(cf * S / E) for top-2 as for top-1 (Mesh-TF, flaxformer): 8
  # tokens, 4 experts, cf 1.0 -> 2 slots, not 4; cf 2.0 holds every choice.
  cfg = _config("top2", train_capacity_factor=1.0, eval_capacity_factor=2.0)
  top2, top1 = SwitchLayer(cfg, "top2"), SwitchLayer(cfg, "top1")
  assert top2.capacity(8, deterministic=False) == 2
  assert top2.capacity(8, deterministic=True) == 4
  assert top2.capacity(8192, False) == top1.capacity(8192, False) == 2048


def test_expert_choice_evaluates_at_its_training_capacity():
  # Each expert fills all C slots, so eval cf 2.0 would give each token ~2
  # experts where training gave ~1. Eval must be the trained function.
  cfg = _config("expert_choice", train_capacity_factor=1.0, eval_capacity_factor=2.0)
  layer = SwitchLayer(cfg, "expert_choice")
  assert layer.capacity(64, deterministic=True) == layer.capacity(64, deterministic=False) == 16
  x, valid = _inputs()
  params = layer.init(jax.random.PRNGKey(0), x, valid)["params"]
  y_eval = layer.apply({"params": params}, x, valid)
  y_train = layer.apply({"params": params}, x, valid, deterministic=False,
                        rngs={"dropout": jax.random.PRNGKey(1)})  # no jitter, no dropout
  np.testing.assert_allclose(y_eval, y_train, atol=1e-7)
  assert float(jnp.abs(y_eval).max()) > 1e-2


def test_expert_choice_eval_capacity_knob():
  cfg = _config("expert_choice", train_capacity_factor=1.0, eval_capacity_factor=4.0,
                expert_choice_eval_capacity_factor=2.0)
  layer = SwitchLayer(cfg, "expert_choice")
  assert layer.capacity(64, deterministic=True) == 32
  assert layer.capacity(64, deterministic=False) == 16
  x, valid = _inputs()
  params = layer.init(jax.random.PRNGKey(0), x, valid)["params"]
  y_eval = layer.apply({"params": params}, x, valid)
  y_train = layer.apply({"params": params}, x, valid, deterministic=False,
                        rngs={"dropout": jax.random.PRNGKey(1)})
  # More experts per token at eval: a different function, not fewer drops.
  assert float(jnp.abs(y_eval - y_train).max()) > 0.2 * float(jnp.abs(y_train).max())
  with pytest.raises(ConfigError, match="expert_choice_eval_capacity_factor"):
    _config("expert_choice", expert_choice_eval_capacity_factor=0.0)


def test_expert_dropout_uses_its_own_rate():
  hidden = jnp.ones((4, 256, 64))
  out = kernels.dropout(hidden, 0.4, jax.random.PRNGKey(1), None)
  np.testing.assert_allclose(float(jnp.mean(out == 0)), 0.4, atol=0.02)
  np.testing.assert_allclose(float(jnp.max(out)), 1 / 0.6, rtol=1e-5)
  cfg = _config("top1", dropout_rate=0.1, expert_dropout_rate=0.4)
  assert cfg.expert_dropout == 0.4 and _config("top1", dropout_rate=0.1).expert_dropout == 0.1
  layer = SwitchLayer(cfg, "top1")
  x, valid = _inputs()
  params = layer.init(jax.random.PRNGKey(0), x, valid)["params"]
  train = [layer.apply({"params": params}, x, valid, deterministic=False,
                       rngs={"dropout": jax.random.PRNGKey(s)}) for s in (1, 2)]
  assert not np.allclose(train[0], train[1])
  # Only the dropped hidden units differ: eval output is unaffected by rngs.
  evals = [layer.apply({"params": params}, x, valid, rngs={"dropout": jax.random.PRNGKey(s)})
           for s in (1, 2)]
  np.testing.assert_array_equal(evals[0], evals[1])


def test_expert_choice_refused_in_a_decoder():
  cfg = _config("top1")
  layer = SwitchLayer(cfg, "expert_choice", causal=True)
  x, valid = _inputs()
  with pytest.raises(ConfigError, match="not causal"):
    layer.init(jax.random.PRNGKey(0), x, valid)
  with pytest.raises(ConfigError, match="decoder_router"):
    get_config("tiny_switch", router="expert_choice")


def test_expert_weights_are_stacked_with_logical_axes():
  cfg = _config("top1")
  layer = SwitchLayer(cfg, "top1")
  x, valid = _inputs()
  params = layer.init(jax.random.PRNGKey(0), x, valid)["params"]
  wi = params["experts"]["wi_0"]
  assert wi.value.shape == (4, D, cfg.d_ff)
  assert wi.names == ("expert", "embed", "mlp")
  assert params["experts"]["wo"].names == ("expert", "mlp", "embed")
  assert params["router"]["kernel"].value.shape == (D, 4)


def test_no_tokens_by_experts_by_capacity_tensor():
  # Memory must stay flat in the number of experts: nothing in the jitted
  # forward and backward of the gather path may reach T * E * C elements.
  cfg = get_config("tiny_switch", num_experts=8, group_size=None, train_capacity_factor=1.0,
                   eval_capacity_factor=1.0, min_expert_capacity=1)
  layer = SwitchLayer(cfg, "top1")
  x = jnp.ones((1, 256, D))
  params = layer.init(jax.random.PRNGKey(0), x)["params"]
  tokens, experts, capacity = 256, 8, 32
  jaxpr = jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x))))(params, x)

  def sizes(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield int(np.prod(var.aval.shape))
      for value in eqn.params.values():
        if hasattr(value, "jaxpr"):
          yield from sizes(value.jaxpr)

  assert max(sizes(jaxpr.jaxpr)) < tokens * experts * capacity


def test_auto_dispatch_is_the_fastest_path_per_backend():
  assert [auto_dispatch(r, "cpu") for r in ("top1", "top2", "expert_choice", "dropless")] == [
      "compact", "compact", "looped", "bucketed"]
  assert auto_dispatch("dropless", "gpu") == auto_dispatch("dropless", "tpu") == "ragged"
  assert auto_dispatch("top1", "cpu", experts_split=True) == "looped"  # 'compact' cannot
  on_cpu = SwitchLayer(_config("dropless"), "dropless").dispatch_kernel()  # tests run on CPU
  assert on_cpu == "bucketed"
  with pytest.raises(ConfigError, match="dropless router's path"):
    _ = SwitchLayer(_config("top1", dispatch="ragged"), "top1").dispatch_kernel()


def test_every_kernel_name_is_in_one_registry():
  assert set(dispatch.EXPERT_KERNELS) == set(DISPATCHES) - {"auto", "reference"}
  for router in ("top1", "top2", "expert_choice", "dropless"):
    for backend in ("cpu", "gpu", "tpu"):
      for split in (False, True):
        assert router in DISPATCHES[auto_dispatch(router, backend, split)]


def test_unsupported_kernels_are_refused_not_swapped():
  # 'compact' packs slots of experts on one device, and each slot once.
  with pytest.raises(ConfigError, match="router 'expert_choice' uses one of"):
    SwitchLayer(_config("expert_choice", dispatch="compact"), "expert_choice").dispatch_kernel()
  split = kernels.ExpertShards("expert", 8, None, ("expert",))
  with pytest.raises(ConfigError, match="splits the experts over 8 devices; use 'auto'"):
    SwitchLayer(_config("top1", dispatch="compact"), "top1").dispatch_kernel(split)
  one_shard = kernels.ExpertShards("expert", 1, None, ("data",))
  assert SwitchLayer(_config("top1", dispatch="compact"), "top1").dispatch_kernel(
      one_shard) == "compact"
  with pytest.raises(ConfigError, match="runs on one device"):
    SwitchLayer(_config("top1", dispatch="reference"), "top1").dispatch_kernel(one_shard)


def test_bucket_sizes():
  sizes = cpu_kernels.bucket_sizes(4096, 8)
  assert sizes[-1] == 4096 and all(s % 8 == 0 for s in sizes) and len(sizes) <= 24
  near_mean = [s for s in sizes if 384 <= s <= 768]
  assert near_mean == list(range(384, 769, 32))  # 1/16 of the 512-row mean
  assert cpu_kernels.bucket_sizes(32, 4) == (8, 16, 32)


@pytest.mark.parametrize("activation", ["relu", "geglu"])
def test_bucketed_kernel_equals_ragged_dot_on_skewed_loads(activation):
  # Empty experts, one expert with most rows (a doubling bucket), rows past
  # the real ones, and expert dropout with the same key: equal outputs and
  # gradients, so 'bucketed' is dropless exactly as 'ragged_dot' is.
  num_rows, experts, f = 96, 5, 16
  sizes = jnp.array([0, 61, 0, 3, 20], jnp.int32)  # 84 real rows of 96
  names = ("wi",) if activation == "relu" else ("wi_0", "wi_1")
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  weights = {name: jax.random.normal(k, (experts, D, f)) / 4 for name, k in zip(names, keys)}
  weights["wo"] = jax.random.normal(keys[3], (experts, f, D)) / 4
  x = jax.random.normal(jax.random.PRNGKey(4), (num_rows, D))
  spec = kernels.LayerSpec("dropless", activation, 0, dropout_rate=0.3)

  def run(kernel, w, x):
    y = kernel(x, sizes, w, spec, jax.random.PRNGKey(5), None)
    return jnp.sum(jnp.sin(y)), y

  results = [jax.jit(jax.value_and_grad(functools.partial(run, kernel), argnums=(0, 1),
                                        has_aux=True))(weights, x)
             for kernel in (cpu_kernels.experts_bucketed, kernels.experts_ragged)]
  (_, y_bucketed), grads_bucketed = results[0]
  (_, y_ragged), grads_ragged = results[1]
  np.testing.assert_allclose(y_bucketed, y_ragged, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(y_bucketed[84:], 0.0)
  # Gradients sum over tokens in each kernel's own order: jax 0.12 (Python
  # 3.12) was seen 3.1e-5 apart on one element in 2,560, jax 0.10 within 1e-5.
  for a, b in zip(jax.tree.leaves(grads_bucketed), jax.tree.leaves(grads_ragged)):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
  assert float(jnp.abs(grads_bucketed[0]["wo"][1]).max()) > 1e-3
  np.testing.assert_array_equal(grads_bucketed[0]["wo"][0], 0.0)  # an empty expert
