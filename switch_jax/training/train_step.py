"""The partitioned train step (the loss itself is model/losses.py's `loss_fn`).

A `TrainState` (step, params, optimizer state) lives sharded on the mesh;
`make_train_step` jits one optimizer step with the state's shardings in and
out, the state donated, and gradients accumulated over microbatches in a
`lax.scan`. The loss of a batch is normalized by its real target tokens, so
accumulating over microbatches gives the same update as one large batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from switch_jax import partitioning
from switch_jax.errors import ConfigError
from switch_jax.model.encoder_decoder import EncoderDecoder
from switch_jax.model.losses import Teacher, loss_fn

Array = jax.Array
Batch = Mapping[str, Array]
# A raw `jax.random.PRNGKey`, abstractly (what eval_shape and lower take).
RNG_SHAPE = jax.ShapeDtypeStruct((2,), jnp.uint32)


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any


def _microbatches(batch: Batch, num_microbatches: int) -> Batch:
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ConfigError(f"batch of {x.shape[0]} cannot be split into {num_microbatches} "
                        f"microbatches; use a divisor")
    return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
  return jax.tree.map(split, dict(batch))


def compute_grads(model: EncoderDecoder, params, batch: Batch, dropout_key: Array, *,
                  num_microbatches: int = 1, z_loss: float = 1e-4,
                  teacher: Optional[Teacher] = None, teacher_params=None):
  """Gradients of the batch loss, summed over microbatches, and mean metrics."""
  weights = batch.get("decoder_loss_weights")
  weights = batch["decoder_target_tokens"] > 0 if weights is None else weights
  num_tokens = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)
  grad_fn = functools.partial(jax.grad(loss_fn, argnums=1, has_aux=True), z_loss=z_loss,
                              teacher=teacher, teacher_params=teacher_params)
  if num_microbatches == 1:
    grads, metrics = grad_fn(model, params, batch, dropout_key)
    return grads, metrics

  def body(acc, inputs):
    index, micro = inputs
    grads, metrics = grad_fn(model, params, micro, jax.random.fold_in(dropout_key, index),
                             num_tokens=num_tokens, num_microbatches=num_microbatches)
    return jax.tree.map(jnp.add, acc, grads), metrics

  micro = _microbatches(batch, num_microbatches)
  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, metrics = jax.lax.scan(body, zeros, (jnp.arange(num_microbatches), micro))
  metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
  metrics["num_tokens"] = num_tokens
  return grads, metrics


def train_step(state: TrainState, batch: Batch, rng: Array, teacher_params=None, *,
               model: EncoderDecoder, optimizer: optax.GradientTransformation,
               num_microbatches: int = 1, z_loss: float = 1e-4,
               teacher: Optional[Teacher] = None) -> tuple[TrainState, dict]:
  """One optimizer step. `rng` is the run's base key; the step folds in.

  A step whose loss or gradients are not finite is not applied: parameters
  and optimizer state stay as they were (the batch is still consumed and the
  step counted), and metrics['finite'] is 0 so the loop can report it.
  """
  dropout_key = jax.random.fold_in(rng, state.step)
  grads, metrics = compute_grads(model, state.params, batch, dropout_key,
                                 num_microbatches=num_microbatches, z_loss=z_loss,
                                 teacher=teacher, teacher_params=teacher_params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics["grad_norm"] = grad_norm
  metrics["finite"] = finite.astype(jnp.float32)
  return TrainState(state.step + 1, keep(params, state.params),
                    keep(opt_state, state.opt_state)), metrics


def init_fn(model: EncoderDecoder, optimizer: optax.GradientTransformation, batch_size: int,
            lengths: tuple[int, int]) -> Callable[[Array], TrainState]:
  """A function rng -> TrainState (boxed params stripped), for jit or eval_shape.

  The dummy tokens are made inside the traced function, so no concrete
  array is created: eval_shape under a mesh of abstract devices (a TPU
  topology compiled for on a CPU, planning/tpu.py) allocates nothing."""

  def init(rng):
    enc = jnp.ones((batch_size, lengths[0]), jnp.int32)
    dec = jnp.ones((batch_size, lengths[1]), jnp.int32)
    params = nn.unbox(model.init(rng, enc, dec)["params"])
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  return init


def state_shardings(model: EncoderDecoder, optimizer, mesh: Mesh, batch_size: int,
                    lengths: tuple[int, int]) -> TrainState:
  """NamedShardings for the train state: params by their logical axes, the
  optimizer state like the parameters it tracks."""
  # Abstract inputs only: `mesh` may hold abstract devices (a TPU topology).
  enc = jax.ShapeDtypeStruct((batch_size, lengths[0]), jnp.int32)
  dec = jax.ShapeDtypeStruct((batch_size, lengths[1]), jnp.int32)
  with jax.set_mesh(None):  # shapes only (see init_fn)
    boxed = jax.eval_shape(lambda r, e, d: model.init(r, e, d)["params"], RNG_SHAPE, enc, dec)
  param_shardings = partitioning.logical_to_sharding(boxed, mesh)
  abstract_params = nn.unbox(boxed)
  opt_state = jax.eval_shape(optimizer.init, abstract_params)
  opt_shardings = partitioning.shardings_like_params(opt_state, abstract_params,
                                                     param_shardings, mesh)
  return TrainState(partitioning.replicated(mesh), param_shardings, opt_shardings)


def make_train_step(model: EncoderDecoder, optimizer, mesh: Mesh, shardings: TrainState, *,
                    num_microbatches: int = 1, z_loss: float = 1e-4, donate: bool = True,
                    teacher: Optional[Teacher] = None, teacher_shardings=None):
  """The jitted, partitioned train step: (state, batch, rng[, teacher_params])
  -> (state, metrics)."""
  step = functools.partial(train_step, model=model, optimizer=optimizer,
                           num_microbatches=num_microbatches, z_loss=z_loss, teacher=teacher)
  in_shardings = (shardings, partitioning.batch_sharding(mesh), partitioning.replicated(mesh))
  if teacher is not None:
    in_shardings += (teacher_shardings,)
  return jax.jit(step, in_shardings=in_shardings,
                 out_shardings=(shardings, partitioning.replicated(mesh)),
                 donate_argnums=(0,) if donate else ())


def make_init(model: EncoderDecoder, optimizer, mesh: Mesh, shardings: TrainState,
              batch_size: int, lengths: tuple[int, int]):
  """The jitted state initializer, writing each shard on its own device."""
  jitted = jax.jit(init_fn(model, optimizer, batch_size, lengths), out_shardings=shardings)

  def init(rng):
    # Traced with no mesh in context: the Switch layers then run unsharded,
    # so the tiny init batch need not split over every batch shard; the
    # output shardings still place each parameter on the mesh.
    with jax.set_mesh(None):
      return jitted(rng)
  return init
