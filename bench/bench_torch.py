"""Hugging Face's PyTorch `SwitchTransformersSparseMLP` at the same shapes.

One routing group: the input is one sequence of all the tokens (HF applies
the capacity per sequence), with HF's `expert_capacity` set to the Switch
layer's capacity for that group. Timed forward + backward in alternation
with the same JAX dense MLP step the Switch layer is measured against, so
the comparison runs through one baseline measured in the same run.
"""

from __future__ import annotations

import os
from typing import Optional

import bench_timer


def available() -> Optional[str]:
  """None if torch and transformers import, else why not."""
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from transformers.models.switch_transformers import modeling_switch_transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as err:
    return str(err)
  return None


def hf_step(num_experts: int, tokens: int, capacity: int, d_model: int, d_ff: int):
  """A callable running HF's sparse MLP forward + backward once."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import SwitchTransformersConfig  # pylint: disable=import-outside-toplevel
  from transformers.models.switch_transformers.modeling_switch_transformers import (  # pylint: disable=import-outside-toplevel
      SwitchTransformersSparseMLP)
  torch.set_num_threads(os.cpu_count() or 1)
  config = SwitchTransformersConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts,
                                    expert_capacity=capacity, dense_act_fn="relu",
                                    router_dtype="float32", dropout_rate=0.0,
                                    router_jitter_noise=0.0)
  torch.manual_seed(0)
  mlp = SwitchTransformersSparseMLP(config).train()
  x = torch.randn(1, tokens, d_model, requires_grad=True)

  def step():
    mlp.zero_grad(set_to_none=True)
    x.grad = None
    y = mlp(x)
    (0.5 * y.square().sum()).backward()  # bench_layer.output_loss
    return None

  return step


def compare(num_experts: int, tokens: int, capacity: int, d_model: int, d_ff: int,
            dense: bench_timer.Compiled, rounds: int, budget_s: float) -> dict:
  step = hf_step(num_experts, tokens, capacity, d_model, d_ff)
  best = bench_timer.interleaved({"hf": step, "dense": dense.run}, rounds, budget_s)
  return {"num_experts": num_experts, "tokens": tokens, "capacity": capacity,
          "hf_seconds": best["hf"], "dense_seconds": best["dense"],
          "hf_ratio": best["hf"] / best["dense"], "hf_tokens_per_s": tokens / best["hf"]}
