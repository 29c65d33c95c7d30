"""The Switch layer against the FLOP-matched dense MLP, forward + backward.

The dense baseline is a jitted `wo(relu(wi x))` with the same d_model,
d_ff, token count and dtype (float32 weights cast to the activation dtype,
as the Switch layer casts its experts); its loss and gradients are the
layer's. The Switch layer is `SwitchLayer` itself through `apply`: router,
routing, dispatch, experts, combine, load-balancing and z losses.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

import bench_timer
from switch_jax.model.moe import kernels
from switch_jax.model.moe import routing
from switch_jax.config import get_config
from switch_jax.model.moe.switch_layer import SwitchLayer, group_layout

D_MODEL, D_FF, SEQUENCE = 512, 2048, 512
GROUP_SIZE = 8192  # ModelConfig's default: 4096 tokens are one group, 16384 two
# (router, kernel) pairs: every router on its CPU default ('compact' for
# top-1 and top-2, 'looped' for expert choice, 'bucketed' for dropless),
# top-1 also on 'looped' and 'gather' (the GPU/TPU default), and dropless
# on 'ragged' (the GPU/TPU default).
KERNELS = [("top1", "compact"), ("top1", "looped"), ("top1", "gather"), ("top2", "compact"),
         ("expert_choice", "looped"), ("dropless", "bucketed"), ("dropless", "ragged")]


def layer_config(num_experts: int, router: str, kernel: str, capacity_factor: float,
                 dtype: str):
  """The ModelConfig of one case and the kernel SwitchLayer resolves it to."""
  base = dict(d_model=D_MODEL, d_ff=D_FF, num_experts=num_experts, ffn_activation="relu",
              train_capacity_factor=capacity_factor, router=router, decoder_router="top1",
              dtype=dtype, group_size=GROUP_SIZE)
  config = get_config("tiny_switch", dispatch=kernel, **base)
  resolved = SwitchLayer(config, router).dispatch_kernel()
  return config, resolved


def output_loss(y):
  """sum(y^2) / 2, whose gradient needs the output y. (With sum(y) the
  gradient is 1 whatever y is, so XLA dropped the dense MLP's second
  forward matmul, and the baseline ran 5 of its 6 matmuls; the Switch layer
  needs its expert outputs for the gates' gradient and ran all 6.)"""
  return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32)))


def switch_step(config, router: str, tokens: int, abstract: bool = False):
  """fwd+bwd of the layer: (params, x) -> grads; returns (fn, args)."""
  layer = SwitchLayer(config, router)
  x = jax.random.normal(jax.random.PRNGKey(1), (tokens // SEQUENCE, SEQUENCE, D_MODEL),
                        jnp.dtype(config.dtype))
  params = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x)["params"])
  if not abstract:
    params = jax.jit(lambda: layer.init(jax.random.PRNGKey(0), x)["params"])()

  def loss(p, x):
    y, state = layer.apply({"params": p}, x, deterministic=False, mutable=["moe"])
    aux = sum(jnp.sum(v[0]) for k, v in state["moe"].items() if k in ("aux_loss", "z_loss"))
    return output_loss(y) + 1e-2 * aux

  args = (params, jax.ShapeDtypeStruct(x.shape, x.dtype) if abstract else x)
  return jax.grad(loss, argnums=(0, 1)), args


def dense_step(tokens: int, dtype: str):
  """fwd+bwd of the FLOP-matched dense MLP: (params, x) -> grads."""
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  params = (jax.random.normal(keys[0], (D_MODEL, D_FF)) * D_MODEL ** -0.5,
            jax.random.normal(keys[1], (D_FF, D_MODEL)) * D_FF ** -0.5)
  x = jax.random.normal(keys[2], (tokens // SEQUENCE, SEQUENCE, D_MODEL), jnp.dtype(dtype))

  def loss(p, x):
    h = jax.nn.relu(x @ p[0].astype(x.dtype))
    return output_loss(h @ p[1].astype(x.dtype))

  return jax.grad(loss, argnums=(0, 1)), (params, x)


def experts_only_step(num_experts: int, tokens: int, dtype: str):
  """fwd+bwd of the experts' matmuls alone, each on exactly tokens / E rows
  (no router, no dispatch, no capacity slack), as one batched matmul per
  weight: what the expert weights cost on this machine, apart from routing.
  Not a lower bound: at 128 experts the looped kernels beat XLA:CPU's
  batched matmul. (params, x) -> grads, like `dense_step`."""
  rows = tokens // num_experts
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  params = (jax.random.normal(keys[0], (num_experts, D_MODEL, D_FF)) * D_MODEL ** -0.5,
            jax.random.normal(keys[1], (num_experts, D_FF, D_MODEL)) * D_FF ** -0.5)
  x = jax.random.normal(keys[2], (num_experts, rows, D_MODEL), jnp.dtype(dtype))
  matmul = kernels.batched_matmul  # the `gather` kernel's

  def loss(p, x):
    return output_loss(matmul(jax.nn.relu(matmul(x, p[0])), p[1]))

  return jax.grad(loss, argnums=(0, 1)), (params, x)


@dataclasses.dataclass
class Case:
  router: str
  kernel: str  # a ModelConfig.dispatch value
  num_experts: int
  tokens: int
  capacity_factor: Optional[float]  # None: dropless
  dtype: str

  @property
  def name(self) -> str:
    cf = "-" if self.capacity_factor is None else f"{self.capacity_factor:g}"
    return f"{self.router}/{self.kernel} E={self.num_experts} T={self.tokens} cf={cf} {self.dtype}"


def expert_weight_bytes(num_experts: int) -> int:
  """float32 bytes of the experts' wi and wo."""
  return num_experts * 2 * D_MODEL * D_FF * 4


def run_case(case: Case, dense: bench_timer.Compiled, rounds: int, budget_s: float) -> dict:
  """One case against the dense MLP; router 'experts_only' times `experts_only_step`."""
  groups, group_tokens = group_layout(case.tokens, GROUP_SIZE)
  capacity = None
  if case.router == "experts_only":
    resolved = case.kernel
    fn, args = experts_only_step(case.num_experts, case.tokens, case.dtype)
  else:
    config, resolved = layer_config(case.num_experts, case.router, case.kernel,
                                    case.capacity_factor or 1.0, case.dtype)
    fn, args = switch_step(config, case.router, case.tokens)
  if case.capacity_factor is not None:
    capacity = routing.expert_capacity(group_tokens, case.num_experts, case.capacity_factor)
  compiled = bench_timer.Compiled.of(fn, *args)
  best = bench_timer.interleaved({"switch": compiled.run, "dense": dense.run}, rounds, budget_s)
  memory = compiled.memory
  return dict(
      case=case.name, router=case.router, path=resolved, num_experts=case.num_experts,
      tokens=case.tokens, groups=groups, capacity=capacity,
      capacity_factor=case.capacity_factor, dtype=case.dtype,
      seconds=best["switch"], dense_seconds=best["dense"],
      ratio=best["switch"] / best["dense"], tokens_per_s=case.tokens / best["switch"],
      dense_tokens_per_s=case.tokens / best["dense"],
      dense_gflops=6 * 2 * case.tokens * D_MODEL * D_FF / best["dense"] / 1e9,
      compile_s=compiled.compile_s,
      temp_bytes=memory.temp_size_in_bytes if memory else None,
      xla_bytes_accessed=compiled.bytes_accessed,
      dense_xla_bytes_accessed=dense.bytes_accessed,
      # Each weight is read forward, read backward and its gradient written.
      min_weight_bytes=3 * expert_weight_bytes(case.num_experts),
      dense_weight_bytes=3 * expert_weight_bytes(1))


def memory_scaling(experts: list[int], token_counts: list[int], kernels) -> list[dict]:
  """Compiled memory of the layer's fwd+bwd (nothing runs)."""
  rows = []
  for tokens in token_counts:
    for num_experts in experts:
      for router, kernel in kernels:
        config, resolved = layer_config(num_experts, router, kernel, 1.0, "float32")
        fn, args = switch_step(config, router, tokens, abstract=True)
        stats = jax.jit(fn).lower(*args).compile().memory_analysis()
        rows.append(dict(router=router, path=resolved, num_experts=num_experts, tokens=tokens,
                         temp_bytes=stats.temp_size_in_bytes,
                         argument_bytes=stats.argument_size_in_bytes,
                         output_bytes=stats.output_size_in_bytes,
                         expert_weight_bytes=expert_weight_bytes(num_experts)))
  return rows
