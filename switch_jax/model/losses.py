"""Losses: token cross-entropy with the output z-loss, plus the router losses.

The training loss is normalized by the number of real target tokens. Router
losses are averaged over Switch layers (as t5x's MoE models do) and scaled
by their factors: `aux_loss_factor * mean_l aux_l + router_z_loss_factor *
mean_l z_l`. `loss_fn` is the model's loss on a batch (as t5x's models.py
holds it), shared by the train step and the teacher-forced evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from switch_jax.config import ModelConfig
from switch_jax.model.encoder_decoder import EncoderDecoder

Array = jax.Array
Batch = Mapping[str, Array]
MODEL_INPUTS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                "encoder_segment_ids", "decoder_segment_ids")


def cross_entropy(logits: Array, targets: Array, weights: Optional[Array] = None,
                  z_loss: float = 0.0) -> tuple[Array, Array]:
  """Per-token negative log-likelihood and output z-loss.

  Args:
    logits: <float32>[B, L, V].
    targets: <int32>[B, L].
    weights: <float32>[B, L] (0 for padding); None means `targets > 0`.
    z_loss: coefficient of `logsumexp(logits)^2`, which keeps the softmax
      normalizer near 1 (t5x uses 1e-4).

  Returns:
    <float32>[B, L] weighted NLL and <float32>[B, L] weighted z-loss term.
  """
  if weights is None:
    weights = (targets > 0).astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = (log_z - target_logit) * weights
  return nll, z_loss * jnp.square(log_z) * weights


def _layer_order(path: tuple) -> tuple:
  """Encoder before decoder, layers by number (not 'layers_11' < 'layers_3')."""
  stack = {"encoder": 0, "decoder": 1}.get(path[0], 2)
  layer = next((int(p.split("_")[1]) for p in path if p.startswith("layers_")), -1)
  return (stack, layer, path)


def switch_layer_names(config: ModelConfig) -> list[str]:
  """'encoder/layers_1', ...: the Switch layers in router_metrics' order."""
  return ([f"encoder/layers_{i}" for i in config.sparse_layers(config.num_encoder_layers)]
          + [f"decoder/layers_{i}" for i in config.sparse_layers(config.num_decoder_layers)])


def router_metrics(moe_state: Mapping) -> dict[str, Array]:
  """Averages the per-layer statistics sown by Switch layers.

  Args:
    moe_state: the 'moe' collection, {path: {..., name: (value,)}}.

  Returns:
    {name: mean over layers}, plus 'expert_fraction_per_layer' <[layers, E]>
    (layers in the order of `switch_layer_names`) and 'num_moe_layers';
    empty for a dense model.
  """
  flat = traverse_util.flatten_dict(dict(moe_state)) if moe_state else {}
  by_name: dict[str, list] = {}
  for path, value in sorted(flat.items(), key=lambda item: _layer_order(item[0])):
    values = value if isinstance(value, tuple) else (value,)
    by_name.setdefault(path[-1], []).extend(values)
  if not by_name:
    return {}
  out = {name: jnp.mean(jnp.stack(values), axis=0) for name, values in by_name.items()
         if name != "max_abs_logit"}
  if "max_abs_logit" in by_name:  # per layer: which layer is near overflow
    out["max_abs_logit_per_layer"] = jnp.stack(by_name["max_abs_logit"])
  out["expert_fraction_per_layer"] = jnp.stack(by_name["expert_fraction"])
  out["num_moe_layers"] = jnp.asarray(len(by_name["aux_loss"]), jnp.float32)
  return out


def total_loss(config: ModelConfig, logits: Array, batch: Mapping[str, Array],
               moe_state: Optional[Mapping] = None, z_loss: float = 1e-4,
               teacher_logits: Optional[Array] = None, teacher_weight: float = 0.0
               ) -> tuple[Array, dict[str, Array]]:
  """The training objective and its parts.

  Args:
    config: supplies the router loss factors.
    logits: <float32>[B, L, V].
    batch: 'decoder_target_tokens' and optionally 'decoder_loss_weights'.
    moe_state: the sown 'moe' collection (None for a dense model).
    z_loss: output-logit z-loss coefficient.
    teacher_logits: <float32>[B, L, V] of a distillation teacher; the token
      loss is then (1 - w) * cross-entropy + w * soft cross-entropy against
      the teacher, w = `teacher_weight` (0.25 in the paper, Table 6).

  Returns:
    Scalar loss (normalized by real target tokens) and metrics: the loss
    terms as they enter the loss ('loss', 'cross_entropy', 'output_z_loss',
    'router_aux_loss', 'router_z_loss': scaled by their factors), 'accuracy',
    'num_tokens', and the raw router statistics 'router/<name>' (means over
    Switch layers, unscaled). What users see of them: `run_logging.METRICS`.
  """
  targets = batch["decoder_target_tokens"]
  weights = batch.get("decoder_loss_weights")
  weights = (targets > 0) if weights is None else weights
  weights = weights.astype(jnp.float32)
  num_tokens = jnp.maximum(jnp.sum(weights), 1.0)
  nll, zl = cross_entropy(logits, targets, weights, z_loss)
  ce = jnp.sum(nll) / num_tokens
  zl = jnp.sum(zl) / num_tokens
  # The target is the argmax where its logit is the largest (a tie counts as
  # right): a max, where argmax's (value, index) reduce ran unvectorized on
  # XLA:CPU (32 ms of a Base-shaped step at vocab 32128).
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
  correct = (target_logit[..., 0] >= jnp.max(logits, axis=-1)) * weights
  metrics = {"cross_entropy": ce, "output_z_loss": zl, "num_tokens": jnp.sum(weights),
             "accuracy": jnp.sum(correct) / num_tokens}
  loss = ce + zl
  if teacher_logits is not None:
    soft = jnp.sum(soft_cross_entropy(logits, teacher_logits, weights)) / num_tokens
    metrics["teacher_cross_entropy"] = soft
    loss = (1.0 - teacher_weight) * ce + teacher_weight * soft + zl
  routers = router_metrics(moe_state)
  if routers:
    aux = config.aux_loss_factor * routers["aux_loss"]
    rz = config.router_z_loss_factor * routers["z_loss"]
    loss = loss + aux + rz
    metrics.update({f"router/{k}": v for k, v in routers.items()})
    metrics["router_aux_loss"] = aux
    metrics["router_z_loss"] = rz
  metrics["loss"] = loss
  return loss, metrics


def soft_cross_entropy(logits: Array, teacher_logits: Array, weights: Array,
                       temperature: float = 1.0) -> Array:
  """<float32>[B, L] weighted `-sum_v p_teacher(v) log p_student(v)` (a
  distillation target; both softened by `temperature`)."""
  teacher = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(teacher * student, axis=-1) * weights


def sequence_scores(logits: Array, targets: Array, weights: Optional[Array] = None) -> Array:
  """<float32>[B] summed target negative log-likelihood of each sequence."""
  nll, _ = cross_entropy(logits, targets, weights)
  return jnp.sum(nll, axis=-1)


def apply_model(model: EncoderDecoder, params, batch: Batch, *, deterministic: bool,
                dropout_key: Optional[Array] = None):
  """Teacher-forced logits <float32>[B, L, V] and the sown 'moe' collection."""
  args = [batch.get(name) for name in MODEL_INPUTS]
  rngs = {"dropout": dropout_key} if dropout_key is not None else {}
  logits, state = model.apply({"params": params}, *args, deterministic=deterministic,
                              rngs=rngs, mutable=["moe"])
  return logits, state.get("moe")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A distillation teacher: its model (eval mode) and the loss weight of
  its soft targets. Its parameters travel as a step argument."""
  model: EncoderDecoder
  weight: float = 0.25


def loss_fn(model: EncoderDecoder, params, batch: Batch, dropout_key: Optional[Array], *,
            z_loss: float = 1e-4, deterministic: bool = False,
            num_tokens: Optional[Array] = None, num_microbatches: int = 1,
            teacher: Optional[Teacher] = None, teacher_params=None):
  """The training loss of a (micro)batch and its metrics.

  For microbatch k of M, `num_tokens` is the whole batch's real target
  tokens: the token terms are renormalized to it and the router terms (means
  over layers) divided by M, so the M microbatch losses sum to the batch's.
  """
  logits, moe = apply_model(model, params, batch, deterministic=deterministic,
                            dropout_key=dropout_key)
  teacher_logits = None
  if teacher is not None:
    teacher_logits, _ = apply_model(teacher.model, teacher_params, batch, deterministic=True)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
  loss, metrics = total_loss(model.config, logits, batch, moe, z_loss=z_loss,
                             teacher_logits=teacher_logits,
                             teacher_weight=teacher.weight if teacher else 0.0)
  if num_tokens is not None:
    token_terms = loss - metrics.get("router_aux_loss", 0.0) - metrics.get("router_z_loss", 0.0)
    router_terms = loss - token_terms
    loss = token_terms * metrics["num_tokens"] / num_tokens + router_terms / num_microbatches
  return loss, metrics


def eval_step(params, batch: Batch, *, model: EncoderDecoder, z_loss: float = 1e-4) -> dict:
  _, metrics = loss_fn(model, params, batch, None, z_loss=z_loss, deterministic=True)
  return metrics
