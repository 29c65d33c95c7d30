"""The encoder-decoder: parameter tree, masking, packing, caching, precision,
initialization, losses and parameter counts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from switch_jax.model import layers
from switch_jax.model import losses
from switch_jax.config import NAMED_CONFIGS, PUBLISHED_SIZES, get_config
from switch_jax.model.encoder_decoder import EncoderDecoder
from switch_jax.model.param_count import abstract_params, count_params

B, LE, LD = 2, 12, 8


def _batch(seed=0, vocab=128):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  enc = jax.random.randint(k1, (B, LE), 2, vocab).at[1, 9:].set(0)
  tgt = jax.random.randint(k2, (B, LD), 2, vocab).at[1, 5:].set(0)
  dec_in = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), tgt[:, :-1]], axis=1)
  return enc, dec_in, tgt


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  return jax.jit(model.apply, static_argnames=("deterministic", "mutable", "method", "decode",
                                               "capture_intermediates"))


def _apply(model, *args, **kwargs):
  """model.apply, compiled once per model and shapes (eager flax is slow)."""
  return _jitted_apply(model)(*args, **kwargs)


def _model(name, **overrides):
  return _build(get_config(name, **overrides))


@functools.lru_cache(maxsize=None)
def _build(cfg):
  """One model and init per distinct config, however it was asked for."""
  model = EncoderDecoder(cfg)
  enc, dec_in, tgt = _batch()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), enc, dec_in, tgt)["params"]
  return cfg, model, params


def test_parameter_tree_layout():
  cfg, _, params = _model("tiny_switch")
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  assert flat["encoder/layers_1/mlp/experts/wi_0"].shape == (4, 32, 64)
  assert flat["encoder/layers_1/mlp/router/kernel"].shape == (32, 4)
  assert flat["encoder/layers_0/mlp/wi_0"].shape == (32, 64)  # layer 0 is dense
  assert flat["decoder/layers_1/encoder_decoder_attention/query"].shape == (32, 2, 16)
  assert flat["encoder/relpos_bias/rel_embedding"].shape == (2, 8)
  assert "decoder/logits_dense" not in flat  # tied
  boxed = traverse_util.flatten_dict(params, sep="/")
  assert boxed["token_embedder/embedding"].names == ("vocab", "embed")
  assert boxed["decoder/layers_1/mlp/experts/wo"].names == ("expert", "mlp", "embed")
  untied = abstract_params(get_config("tiny_switch", tie_embeddings=False))
  assert nn.unbox(untied)["decoder"]["logits_dense"].shape == (32, 128)


@pytest.mark.parametrize("bias_batch", [1, 3])
def test_attention_bias_gradient_equals_the_broadcast_add(bias_batch):
  logits, bias, w = (jax.random.normal(jax.random.PRNGKey(i), shape) for i, shape in enumerate(
      [(3, 2, 4, 5), (bias_batch, 2, 4, 5), (3, 2, 4, 5)]))
  loss = lambda add: lambda l, b: jnp.sum(jax.nn.softmax(add(l, b), axis=-1) * w)
  ours = jax.grad(loss(layers.add_bias), argnums=(0, 1))(logits, bias)
  plain = jax.grad(loss(jnp.add), argnums=(0, 1))(logits, bias)
  for a, b in zip(ours, plain):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_reduced_scale_truncated_normal_init():
  cfg, _, params = _model("tiny_dense", d_model=256, d_ff=512)
  wi = np.asarray(nn.unbox(params)["encoder"]["layers_0"]["mlp"]["wi_0"])
  np.testing.assert_allclose(wi.std(), np.sqrt(0.1 / 256), rtol=0.03)
  assert np.abs(wi).max() <= 2 * np.sqrt(0.1 / 256) * 1.14  # truncated at 2 sigma (scaled)
  q = np.asarray(nn.unbox(params)["encoder"]["layers_0"]["attention"]["query"])
  np.testing.assert_allclose(q.std(), np.sqrt(0.1 / 256 / 16), rtol=0.05)  # 1/sqrt(head_dim) folded


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_switch"])
def test_padding_does_not_change_real_positions(name):
  cfg, model, params = _model(name)  # tiny configs route one sequence per group
  assert cfg.group_size is None
  enc, dec_in, tgt = _batch()
  logits = _apply(model, {"params": params}, enc, dec_in, tgt)
  pad = lambda t, n: jnp.pad(t, ((0, 0), (0, n)))
  longer = _apply(model, {"params": params}, pad(enc, 4), pad(dec_in, 3), pad(tgt, 3))
  real = np.asarray(tgt > 0)  # padded target positions are never read
  np.testing.assert_allclose(np.asarray(longer[:, :LD])[real], np.asarray(logits)[real], atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_switch"])
def test_packing_equals_separate_examples(name):
  # Two examples packed into one row attend only within their segment.
  cfg, model, params = _model(name, group_size=None, eval_capacity_factor=8.0)
  enc, dec_in, tgt = _batch()
  e0, e1 = enc[0, :6], enc[1, :5]
  t0, t1 = tgt[0, :4], tgt[1, :3]
  shift = lambda t: jnp.concatenate([jnp.zeros((1,), jnp.int32), t[:-1]])
  packed = _apply(
      model, {"params": params}, jnp.concatenate([e0, e1])[None],
      jnp.concatenate([shift(t0), shift(t1)])[None], jnp.concatenate([t0, t1])[None],
      jnp.array([[1] * 6 + [2] * 5]), jnp.array([[1] * 4 + [2] * 3]))
  alone0 = _apply(model, {"params": params}, e0[None], shift(t0)[None], t0[None])
  alone1 = _apply(model, {"params": params}, e1[None], shift(t1)[None], t1[None])
  np.testing.assert_allclose(packed[0, :4], alone0[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 4:], alone1[0], atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_switch", "tiny_switch_relu"])
def test_incremental_decoding_equals_teacher_forcing(name):
  cfg, model, params = _model(name, tie_embeddings=name != "tiny_switch_relu")
  enc, dec_in, _ = _batch()
  full = _apply(model, {"params": params}, enc, dec_in)
  encoded = _apply(model, {"params": params}, enc, method="encode")
  _, state = _apply(model, {"params": params}, encoded, enc, jnp.zeros_like(dec_in), decode=True,
                         mutable=("cache",), method="decode")
  step = jax.jit(lambda cache, token: model.apply(
      {"params": params, "cache": cache}, encoded, enc, token, decode=True, mutable=["cache"],
      method="decode"))
  cache, outs = state["cache"], []
  for t in range(LD):
    logits, state = step(cache, dec_in[:, t:t + 1])
    cache = state["cache"]
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_bfloat16_activations_keep_float32_router_and_params():
  cfg, model, params = _model("tiny_switch")
  enc, dec_in, tgt = _batch()
  bf16 = EncoderDecoder(cfg.replace(dtype="bfloat16"))
  logits32 = _apply(model, {"params": params}, enc, dec_in, tgt)
  logits16, state = _apply(bf16, {"params": params}, enc, dec_in, tgt, mutable=("moe",))
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits32, atol=0.15)
  # The router ran in float32: its z-loss is a float32 statistic equal to
  # the float32 model's to bf16-input precision.
  _, state32 = _apply(model, {"params": params}, enc, dec_in, tgt, mutable=("moe",))
  z16 = state["moe"]["encoder"]["layers_1"]["mlp"]["z_loss"][0]
  z32 = state32["moe"]["encoder"]["layers_1"]["mlp"]["z_loss"][0]
  assert z16.dtype == jnp.float32
  np.testing.assert_allclose(z16, z32, rtol=1e-2)


def test_dropout_only_in_training():
  cfg, _, params = _model("tiny_switch")
  model = EncoderDecoder(cfg.replace(dropout_rate=0.3))
  enc, dec_in, tgt = _batch()
  a = _apply(model, {"params": params}, enc, dec_in, tgt)
  b = _apply(model, {"params": params}, enc, dec_in, tgt, rngs={"dropout": jax.random.PRNGKey(3)})
  np.testing.assert_array_equal(a, b)
  c = _apply(model, {"params": params}, enc, dec_in, tgt, deterministic=False,
                  rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(a, c)


def test_total_loss_adds_averaged_router_losses():
  _, model, params = _model("tiny_switch")
  cfg = model.config.replace(aux_loss_factor=0.01, router_z_loss_factor=0.001)
  enc, dec_in, tgt = _batch()
  logits, state = _apply(model, {"params": params}, enc, dec_in, tgt, mutable=("moe",))
  loss, metrics = losses.total_loss(cfg, logits, {"decoder_target_tokens": tgt}, state["moe"],
                                    z_loss=1e-4)
  moe = traverse_util.flatten_dict(state["moe"])
  aux = np.mean([v[0] for k, v in moe.items() if k[-1] == "aux_loss"])
  zl = np.mean([v[0] for k, v in moe.items() if k[-1] == "z_loss"])
  weights = np.asarray(tgt > 0, np.float32)
  logp = jax.nn.log_softmax(logits)
  nll = -np.take_along_axis(np.asarray(logp), np.asarray(tgt)[..., None], -1)[..., 0]
  lse = np.asarray(jax.nn.logsumexp(logits, -1))
  expected = ((nll * weights).sum() + 1e-4 * (lse ** 2 * weights).sum()) / weights.sum()
  expected += 0.01 * aux + 0.001 * zl
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert metrics["router/expert_fraction_per_layer"].shape == (2, 4)
  np.testing.assert_allclose(metrics["num_tokens"], weights.sum())


# Parameter counts: exact where the published figure is precise, within the
# rounding of the paper's table otherwise ("7B", "26B").
@pytest.mark.parametrize("name,rtol", [
    ("t5_base", 0.002), ("switch_base_8", 0.002), ("switch_c", 0.001),
    ("switch_xxl_128", 0.002), ("switch_base_128", 0.005), ("switch_large_128", 0.015),
    ("t5_large", 0.02), ("t5_xxl", 0.02), ("switch_base", 0.06), ("switch_large", 0.05),
    ("switch_c_2048", 0.02),
])
def test_parameter_counts_match_published_sizes(name, rtol):
  total = count_params(NAMED_CONFIGS[name])["total"]
  np.testing.assert_allclose(total, PUBLISHED_SIZES[name], rtol=rtol)


def test_expert_parameters_scale_with_experts_not_the_rest():
  c8 = count_params(NAMED_CONFIGS["switch_base_8"])
  c16 = count_params(NAMED_CONFIGS["switch_base_16"])
  assert c16["expert"] == 2 * c8["expert"]
  # Only the routers grow among the non-expert parameters: 12 layers x d x 8.
  assert c16["non_expert"] - c8["non_expert"] == 12 * 768 * 8


@pytest.mark.parametrize("tied", [True, False])
def test_vocabulary_logits_are_float32_under_the_bfloat16_policy(tied):
  # The decoder's last hidden state is bfloat16; the projection onto the
  # vocabulary must not round the logits to bfloat16 (t5x computes it in
  # float32). Rounded, they would be off by up to ~4e-3 relative.
  cfg, _, params = _model("tiny_switch", tie_embeddings=tied)
  bf16 = EncoderDecoder(cfg.replace(dtype="bfloat16"))
  enc, dec_in, tgt = _batch()
  logits, state = _apply(bf16, {"params": params}, enc, dec_in, tgt,
                         mutable=("intermediates",), capture_intermediates=True)
  hidden = state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0]
  assert hidden.dtype == jnp.bfloat16
  hidden = np.asarray(hidden, np.float64)
  weights = nn.meta.unbox(params)
  if tied:
    expected = hidden * cfg.d_model ** -0.5 @ np.asarray(
        weights["token_embedder"]["embedding"], np.float64).T
  else:
    expected = hidden @ np.asarray(weights["decoder"]["logits_dense"], np.float64)
  assert np.max(np.abs(expected)) > 0.5  # large enough for bfloat16 rounding to show
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
