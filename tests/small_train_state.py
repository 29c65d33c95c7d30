"""A small stand-in for a TrainState, for checkpoint tests that need no
model: random float32 arrays of chosen sizes saved through
`TrainCheckpointer` as params and optimizer state."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from switch_jax.config import ModelConfig


@flax.struct.dataclass
class State:
  """What `TrainCheckpointer.save` reads from a TrainState."""
  step: jax.Array
  params: dict
  opt_state: dict


def make(step: int, kilobytes: int = 64, seed: int = 0, arrays: int = 1) -> State:
  """A state whose params hold about `kilobytes` KiB of random float32, in
  `arrays` matrices (a model has hundreds)."""
  rng = np.random.default_rng(seed + step)
  side = max(1, int((kilobytes * 256 / arrays) ** 0.5))
  weights = {f"w{i}" if i else "w": jnp.asarray(rng.normal(size=(side, side)), jnp.float32)
             for i in range(arrays)}
  return State(step=jnp.asarray(step, jnp.int32),
               params={**weights, "b": jnp.asarray(rng.normal(size=(side,)), jnp.float32)},
               opt_state={"m": jnp.asarray(rng.normal(size=(side,)), jnp.float32)})


def abstract(state: State) -> State:
  return jax.eval_shape(lambda: state)


def save(checkpointer, state: State) -> None:
  step = int(state.step)
  checkpointer.save(step, state, ModelConfig(), {"batches": step})


def assert_equal(a: State, b: State) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
