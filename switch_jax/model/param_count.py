"""Parameter counts from abstract shapes (`jax.eval_shape`): Switch-C's 1.6
trillion parameters are counted without allocating one of them."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from switch_jax.config import ModelConfig
from switch_jax.model.encoder_decoder import EncoderDecoder


def abstract_params(config: ModelConfig, batch: int = 1, length: int = 8):
  """The parameter tree as `jax.ShapeDtypeStruct`s, with logical-axis boxes."""
  model = EncoderDecoder(config)
  tokens = jnp.ones((batch, length), jnp.int32)
  init = lambda: model.init(jax.random.PRNGKey(0), tokens, tokens)
  with jax.set_mesh(None):  # shapes do not depend on a mesh in context
    return jax.eval_shape(init)["params"]


def count_params(config: ModelConfig) -> dict[str, int]:
  """{'total', 'expert', 'non_expert'} parameter counts."""
  params = nn.unbox(abstract_params(config))
  total = expert = 0
  for path, leaf in traverse_util.flatten_dict(params).items():
    n = math.prod(leaf.shape)
    total += n
    if "mlp" in path and path[-1] in ("wi", "wi_0", "wi_1", "wo") and len(leaf.shape) == 3:
      expert += n
  return {"total": total, "expert": expert, "non_expert": total - expert}
