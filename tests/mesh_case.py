"""A small sharded Switch model and batch shared by the mesh tests and the
two-process worker (which cannot import a test module's fixtures)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from switch_jax import partitioning
from switch_jax.training import train_step as ts
from switch_jax.config import get_config
from switch_jax.model.encoder_decoder import EncoderDecoder

BATCH, LENGTH = 8, 8


def config(router="top1", **kw):
  """8 experts (so every mesh axis of 8 divides them), one routing group per
  sequence, capacity factor 1.0 so tokens are dropped."""
  base = dict(num_experts=8, group_size=LENGTH, train_capacity_factor=1.0,
              eval_capacity_factor=1.0, min_expert_capacity=1, router=router,
              decoder_router=None)
  base.update(kw)
  return get_config("tiny_switch", **base)


def batch(seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, 128, (BATCH, LENGTH)).astype(np.int32)
  tgt = rng.integers(2, 128, (BATCH, LENGTH)).astype(np.int32)
  enc[3, 5:] = 0
  tgt[5, 4:] = 0
  dec = np.concatenate([np.zeros((BATCH, 1), np.int32), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt}


def run_train_steps(mesh_shape, steps=2, router="top1"):
  """Adam steps of the sharded model on `mesh_shape`; returns the losses
  and a checksum of the final parameters (a replicated scalar)."""
  model = EncoderDecoder(config(router))
  optimizer = optax.adam(1e-2)
  mesh = partitioning.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    shardings = ts.state_shardings(model, optimizer, mesh, BATCH, (LENGTH, LENGTH))
    state = ts.make_init(model, optimizer, mesh, shardings, BATCH, (LENGTH, LENGTH))(
        jax.random.PRNGKey(0))
    step = ts.make_train_step(model, optimizer, mesh, shardings)
    sharding = partitioning.batch_sharding(mesh)
    losses = []
    for _ in range(steps):
      host = batch()  # the same batch each step, so the loss must fall
      global_batch = {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
                      for k, v in host.items()}
      state, metrics = step(state, global_batch, jax.random.PRNGKey(1))
      losses.append(float(metrics["loss"]))
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)),
                       out_shardings=partitioning.replicated(mesh))(state.params)
  return losses, checksum
