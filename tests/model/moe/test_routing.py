"""Routing functions: exact goldens, hand-computed drop patterns, a numpy
reference for slot positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_jax.model.moe import routing

# flaxformer's / Hugging Face's golden inputs (generated under an older JAX
# PRNG, so they are spelled out rather than regenerated).
GOLDEN_PROBS = np.array([[0.35490513, 0.60419905], [0.4275843, 0.23061597],
                         [0.32985854, 0.43953657], [0.25099766, 0.27730572],
                         [0.7678207, 0.71474564]], np.float32)
GOLDEN_INDICES = np.array([[0], [1], [1], [0], [0]], np.int32)
GOLDEN_LOGITS = np.array([
    [[-4.2124424, 3.891939, -3.6481273, 1.8849981],
     [0.32625437, 2.918651, 0.84758997, -4.556842],
     [-3.32062, 4.6977115, -0.15439987, 0.44086337],
     [3.4467149, 4.3436565, -4.7224274, -4.264637],
     [-2.224406, -2.5318158, -1.3832569, 1.1891162],
     [-2.320062, -0.44705987, 4.289819, -0.00662684]],
    [[0.99470854, -0.6992364, 0.25503993, 4.2952085],
     [3.5937333, -3.2408535, -4.298278, 4.426601],
     [0.7669008, 2.6588762, 2.4505413, 4.6051874],
     [0.23330331, -3.0845237, 0.6262374, -2.9865491],
     [0.7595146, -2.1099675, -4.155346, -2.8326452],
     [2.3771453, 1.004138, -3.1781673, 0.7581556]]], np.float32)


def test_load_balancing_loss_golden():
  loss = routing.load_balancing_loss(GOLDEN_PROBS[None], GOLDEN_INDICES[None])
  np.testing.assert_allclose(loss, 0.8741045, rtol=1e-6)


def test_router_z_loss_golden():
  np.testing.assert_allclose(routing.router_z_loss(GOLDEN_LOGITS), 13.786719, rtol=1e-6)


def test_aux_loss_is_one_at_perfect_balance():
  # 8 tokens, 4 experts, each expert chosen twice, uniform probabilities:
  # E * sum_i (1/4)(1/4) = 1, so alpha * aux = alpha.
  probs = jnp.full((1, 8, 4), 0.25)
  index = jnp.array([0, 1, 2, 3, 3, 2, 1, 0], jnp.int32)[None, :, None]
  np.testing.assert_allclose(routing.load_balancing_loss(probs, index), 1.0, rtol=1e-6)
  # All tokens on one expert with all the probability mass: E * 1 * 1 = E.
  probs = jax.nn.one_hot(jnp.zeros((1, 8), jnp.int32), 4)
  index = jnp.zeros((1, 8, 1), jnp.int32)
  np.testing.assert_allclose(routing.load_balancing_loss(probs, index), 4.0, rtol=1e-6)


def test_padding_is_ignored_by_aux_and_z_loss():
  probs = jnp.asarray(GOLDEN_PROBS[None])
  index = jnp.asarray(GOLDEN_INDICES[None])
  valid = jnp.array([[True, True, True, False, False]])
  expected = routing.load_balancing_loss(probs[:, :3], index[:, :3])
  np.testing.assert_allclose(routing.load_balancing_loss(probs, index, valid), expected, rtol=1e-6)
  logits = jnp.asarray(GOLDEN_LOGITS[:1])
  valid = jnp.array([[True] * 4 + [False] * 2])
  np.testing.assert_allclose(routing.router_z_loss(logits, valid),
                             routing.router_z_loss(logits[:, :4]), rtol=1e-6)


@pytest.mark.parametrize("tokens,experts,factor,minimum,explicit,expected", [
    (8192, 128, 1.25, 4, None, 80),   # round(1.25 * 64)
    (4096, 128, 1.0, 4, None, 32),
    (32, 128, 1.0, 4, None, 4),       # the minimum
    (6, 2, 2.0, 4, None, 6),          # never more than the tokens
    (8, 4, 1.0, 1, None, 2),          # top-2 too: slots per token, not per choice
    (100, 4, 2.5, 4, None, 62),       # round(62.5) = 62 (round half to even)
    (100, 4, 1.25, 4, 7, 7),          # explicit capacity
])
def test_expert_capacity(tokens, experts, factor, minimum, explicit, expected):
  assert routing.expert_capacity(tokens, experts, factor, minimum, explicit) == expected


def _probs_for(choices, num_experts, gates=None):
  """Router probabilities whose argmax is `choices`, top prob `gates`."""
  choices = np.asarray(choices)
  gates = np.full(choices.shape, 0.9) if gates is None else np.asarray(gates)
  probs = np.full(choices.shape + (num_experts,), 0.0, np.float32)
  rest = (1.0 - gates) / (num_experts - 1)
  probs[...] = rest[..., None]
  np.put_along_axis(probs, choices[..., None], gates[..., None], axis=-1)
  return jnp.asarray(probs[None])


def test_all_padding_group_is_left_out_of_the_aux_mean():
  # Group 1 has no real token: the mean is group 0's loss, not half of it.
  probs = jnp.concatenate([jnp.asarray(GOLDEN_PROBS[None])] * 2)
  index = jnp.concatenate([jnp.asarray(GOLDEN_INDICES[None])] * 2)
  valid = jnp.array([[True] * 5, [False] * 5])
  np.testing.assert_allclose(routing.load_balancing_loss(probs, index, valid), 0.8741045,
                             rtol=1e-6)
  _, stats = routing.token_choice_routing(probs, valid, num_selected=1, capacity=5)
  _, alone = routing.token_choice_routing(probs[:1], valid[:1], num_selected=1, capacity=5)
  np.testing.assert_allclose(stats.groups, 1.0)
  np.testing.assert_allclose(stats.metrics()["aux_loss"], alone.metrics()["aux_loss"], rtol=1e-6)
  assert float(alone.metrics()["aux_loss"]) > 0.8
  _, stats = routing.expert_choice_routing(probs, valid, capacity=2)
  np.testing.assert_allclose(stats.groups, 1.0)


def test_hand_computed_drop_pattern():
  # Six tokens choose experts 0,0,1,0,1,1 with capacity 2: the third token
  # to pick an expert overflows, i.e. tokens 3 and 5.
  probs = _probs_for([0, 0, 1, 0, 1, 1], 2)
  plan, stats = routing.token_choice_routing(probs, jnp.ones((1, 6), bool),
                                             num_selected=1, capacity=2)
  kept = np.asarray(plan.token_slot[0, :, 0] < 4)
  np.testing.assert_array_equal(kept, [1, 1, 1, 0, 1, 0])
  np.testing.assert_array_equal(plan.token_slot[0, :, 0], [0, 1, 2, 4, 3, 4])
  np.testing.assert_array_equal(plan.slot_token[0], [0, 1, 2, 4])
  np.testing.assert_allclose(plan.slot_weight[0], [0.9] * 4, rtol=1e-6)
  np.testing.assert_allclose(stats.metrics()["fraction_dropped"], 2 / 6, rtol=1e-6)
  np.testing.assert_allclose(stats.metrics()["expert_fraction"], [0.5, 0.5], rtol=1e-6)


def test_batch_prioritized_routing_keeps_confident_tokens():
  # Same choices with gates: batch-prioritized routing fills slots by
  # confidence, so expert 0 keeps tokens 3, 0 (gates .95, .9) and drops 1
  # (.8); expert 1 keeps 5, 4 (.99, .85) and drops 2 (.6).
  probs = _probs_for([0, 0, 1, 0, 1, 1], 2, gates=[0.9, 0.8, 0.6, 0.95, 0.85, 0.99])
  plan, _ = routing.token_choice_routing(probs, jnp.ones((1, 6), bool), num_selected=1,
                                         capacity=2, batch_prioritized=True)
  np.testing.assert_array_equal(np.asarray(plan.token_slot[0, :, 0] < 4), [1, 0, 0, 1, 1, 1])


def test_top2_first_choices_claim_slots_before_second_choices():
  # Expert 0 is every token's second choice except token 2's first: token 2
  # takes slot 0 of expert 0 although its index is highest, then tokens 0, 1
  # (second choices) take the rest in token order.
  probs = jnp.array([[[0.3, 0.6, 0.1], [0.3, 0.1, 0.6], [0.6, 0.3, 0.1]]])
  plan, _ = routing.token_choice_routing(probs, jnp.ones((1, 3), bool), num_selected=2,
                                         capacity=2)
  expert0_slots = np.asarray(plan.slot_token[0, :2])
  np.testing.assert_array_equal(expert0_slots, [2, 0])  # token 1's 2nd choice dropped
  np.testing.assert_array_equal(plan.token_slot[0, 1], [4, 6])  # 1st kept, 2nd dropped (E*C=6)


def _positions_numpy(expert_index, valid, num_experts, order):
  g, s, k = expert_index.shape
  out = np.full((g, s, k), s * k)
  for gi in range(g):
    counts = np.zeros(num_experts, int)
    for a in order[gi]:
      choice, token = divmod(int(a), s)
      if valid[gi, token]:
        e = expert_index[gi, token, choice]
        out[gi, token, choice] = counts[e]
        counts[e] += 1
  return out


@pytest.mark.parametrize("k,prioritized", [(1, False), (1, True), (2, False), (2, True)])
def test_positions_match_a_python_loop(k, prioritized):
  rng = np.random.default_rng(k + 2 * prioritized)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 17, 5)), jnp.float32))
  valid = jnp.asarray(rng.random((3, 17)) > 0.2)
  index, gate = routing.top_k_choices(probs, k)
  order = routing._priority_order(gate, prioritized)
  got = routing.positions_in_expert(index, valid, 5, order)
  want = _positions_numpy(np.asarray(index), np.asarray(valid), 5, np.asarray(order))
  np.testing.assert_array_equal(got, want)


def test_padding_does_not_use_capacity():
  probs = _probs_for([0, 0, 0, 0], 2)
  valid = jnp.array([[False, True, False, True]])
  plan, stats = routing.token_choice_routing(probs, valid, num_selected=1, capacity=2)
  np.testing.assert_array_equal(plan.token_slot[0, :, 0], [4, 0, 4, 1])
  np.testing.assert_allclose(stats.metrics()["fraction_dropped"], 0.0)


def test_expert_choice_picks_top_tokens_per_expert():
  probs = jnp.array([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]])
  plan, stats = routing.expert_choice_routing(probs, jnp.ones((1, 4), bool), capacity=2)
  np.testing.assert_array_equal(plan.slot_token[0], [0, 2, 1, 3])
  np.testing.assert_allclose(plan.slot_weight[0], [0.9, 0.6, 0.8, 0.7], rtol=1e-6)
  np.testing.assert_allclose(stats.metrics()["fraction_dropped"], 0.0)
  plan, stats = routing.expert_choice_routing(probs, jnp.ones((1, 4), bool), capacity=1)
  np.testing.assert_array_equal(plan.slot_token[0], [0, 1])
  np.testing.assert_allclose(stats.metrics()["fraction_dropped"], 0.5)


def test_dropless_sorts_by_expert():
  probs = _probs_for([2, 0, 2, 1, 0], 3)
  valid = jnp.array([[True, True, True, True, False]])
  plan, stats = routing.dropless_routing(probs, valid)
  np.testing.assert_array_equal(plan.group_sizes, [1, 1, 2])
  np.testing.assert_array_equal(plan.order, [1, 3, 0, 2, 4])
  np.testing.assert_allclose(plan.weight[0, :, 0], [0.9, 0.9, 0.9, 0.9, 0.0], rtol=1e-6)
  np.testing.assert_allclose(stats.metrics()["fraction_dropped"], 0.0)


def test_jitter_multiplies_inputs_in_training_only():
  x = jnp.ones((1, 3, 4))
  kernel = jnp.eye(4)[:, :2]
  clean = routing.router_logits(x, kernel)
  np.testing.assert_allclose(routing.router_logits(x, kernel, jitter_noise=0.1), clean)
  noisy = routing.router_logits(x, kernel, jitter_noise=0.1, jitter_key=jax.random.PRNGKey(0))
  assert not np.allclose(noisy, clean)
  assert np.all(np.abs(noisy - clean) <= 0.1 + 1e-6)  # inputs scaled within 1 +- eps
  assert routing.router_logits(x.astype(jnp.bfloat16), kernel).dtype == jnp.float32
