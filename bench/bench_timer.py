"""Timing on a shared machine: every figure is a ratio or a rate from one run.

Other jobs may share the CPUs, so a case is never timed alone: it is timed
in alternation with its baseline (A B A B ...), and each side keeps its
fastest call. The fastest call is the one least disturbed by other load;
a ratio of two minima from interleaved rounds stays put when the load
drifts, where two separate averages would not.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp


def load_average() -> float:
  return os.getloadavg()[0]


def call_seconds(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


@dataclasses.dataclass
class Compiled:
  """A jitted function compiled ahead of time on fixed arguments."""
  run: Callable[[], object]
  compile_s: float
  memory: Optional[object]  # XLA's CompiledMemoryStats
  bytes_accessed: Optional[float]  # XLA's cost-analysis estimate
  flops: Optional[float]  # the same analysis's FLOPs

  @classmethod
  def of(cls, fn, *args) -> "Compiled":
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    try:
      memory = compiled.memory_analysis()
    except Exception:  # pylint: disable=broad-except  # not every backend has it
      memory = None
    try:
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      accessed = float(cost.get("bytes accessed", 0.0)) or None
      flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # pylint: disable=broad-except
      accessed = flops = None
    return cls(lambda: compiled(*args), compile_s, memory, accessed, flops)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float = 120.0
                ) -> dict[str, float]:
  """Fastest seconds per call of each function, timed in alternation.

  One warm-up call each; then `rounds` rounds (fewer, at least 2, when a
  round would overrun `budget_s`).
  """
  first = {name: call_seconds(fn) for name, fn in fns.items()}  # warm-up (and a first guess)
  per_round = sum(first.values())
  rounds = max(2, min(rounds, int(budget_s / max(per_round, 1e-9))))
  best = dict(first)
  for _ in range(rounds):
    for name, fn in fns.items():
      best[name] = min(best[name], call_seconds(fn))
  return best


PEAK_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096), (4096, 512, 2048), (4096, 2048, 512))


def matmul(m: int, k: int, n: int, dtype=jnp.float32) -> tuple[Callable[[], object], int]:
  """A jitted [m, k] x [k, n] matmul on fixed operands, and its FLOPs."""
  a = jax.random.normal(jax.random.PRNGKey(0), (m, k), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (k, n), dtype)
  compiled = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  return (lambda: compiled(a, b)), 2 * m * k * n


def matmul_peak(rounds: int = 5) -> dict[str, float]:
  """The best GFLOP/s of XLA's matmul here, float32 and bfloat16, over
  square 2048 and 4096 and the Switch layer's own [4096, 512] x [512, 2048]
  (and its transpose), the shapes timed in alternation."""
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    fns, flops = {}, {}
    for shape in PEAK_SHAPES:
      fns[shape], flops[shape] = matmul(*shape, dtype)
    best = interleaved(fns, rounds)
    out[jnp.dtype(dtype).name] = max(flops[s] / best[s] / 1e9 for s in PEAK_SHAPES)
  return out
