"""Optimizers and learning-rate schedules (SPEC section 3).

Pretraining uses Adafactor (Shazeer & Stern, 2018) as t5x runs it for T5 and
Switch: factored second moments with decay exponent 0.8, update clipping at
RMS 1.0, steps relative to the parameter's scale, no momentum, and the
learning rate `1 / sqrt(max(step, 10000))`. Fine-tuning uses a constant 1e-3.

What makes this Adafactor MoE-aware is `factor_rules`: an expert weight
<float32>[E, d, f] is E separate matrices, so E is a batch axis. Each expert
keeps its own row statistics [E, d], column statistics [E, f], parameter
scale and update clipping. (`optax.adafactor` factors the two largest dims,
which for E > d averages squared gradients over experts.) The rules come
from the logical axis names the layers give every parameter, once, outside
jit.

Step convention (t5x and optax agree): a step counts the updates already
applied, so the first update is step 0 and sees `schedule(0)` and the
second-moment decay `1 - (0 + 1)^-0.8 = 0`, i.e. no history yet.

The factoring follows t5x's published code (Apache-2.0) in `t5x.adafactor`:
`LOGICAL_FACTOR_DIMS` plays the part of `standard_logical_factor_rules` and
its `FactorDim` roles (batch, row, column, none), and the factored update
that of `Adafactor.apply_param_gradient`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from switch_jax.errors import ConfigError

Array = jax.Array
Schedule = Callable[[Array], Array]
ScalarOrSchedule = Union[float, Schedule]

BATCH, ROW, COL = "batch", "row", "col"

# Logical axis -> its role in factoring (t5x's rules plus its MoE rules).
# None: the parameter is kept unfactored (its batch axes still hold).
LOGICAL_FACTOR_DIMS = {
    "expert": BATCH,
    "embed": ROW,
    "mlp": COL,
    "heads": COL,
    "kv": COL,
    "vocab": COL,
    "relpos_buckets": None,
    "unmodeled": None,
}


@dataclasses.dataclass(frozen=True)
class FactorRule:
  """How one parameter's second moment is stored.

  `batch` dims index independent matrices (the expert axis); `row` and `col`
  are the dims of each matrix, several of them read jointly (an attention
  kernel [d, H, hd] is the matrix [d, H * hd], as in t5x). Empty `row` and
  `col`: unfactored, one statistic per weight. Every statistic, the
  parameter scale and the update clipping are per batch entry.
  """
  batch: tuple[int, ...] = ()
  row: tuple[int, ...] = ()
  col: tuple[int, ...] = ()

  @property
  def factored(self) -> bool:
    return bool(self.row) and bool(self.col)

  def averaging_dims(self, ndim: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i not in self.batch)


def _is_boxed(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _rule(path, shape, names, min_dim_size_to_factor: int) -> FactorRule:
  where = jax.tree_util.keystr(path)
  ndim = len(shape)
  if names and any(n is not None for n in names):
    if len(names) != ndim:
      raise ConfigError(f"{where}: axis names {names} do not fit shape {tuple(shape)}")
    unknown = [n for n in names if n not in LOGICAL_FACTOR_DIMS]
    if unknown:
      raise ConfigError(f"{where}: no Adafactor role for logical axes {unknown}; add them to "
                        f"optimizers.LOGICAL_FACTOR_DIMS (batch, row, col or None)")
    roles = [LOGICAL_FACTOR_DIMS[n] for n in names]
    dims = {role: tuple(i for i, r in enumerate(roles) if r == role) for role in (BATCH, ROW, COL)}
    if dims[BATCH] or ndim > 2:
      if dims[ROW] and dims[COL] and None not in roles:
        return FactorRule(dims[BATCH], dims[ROW], dims[COL])
      return FactorRule(dims[BATCH])
  # A plain matrix: the classic rule (t5x and optax agree): factor the two
  # largest dims when both are large enough for factoring to save memory.
  if ndim > 2:
    raise ConfigError(f"{where}: a {ndim}-D parameter needs logical axis names to be factored; "
                      f"pass the boxed tree from model.init (or its nn.get_partition_spec)")
  if ndim < 2:
    return FactorRule()
  order = np.argsort(shape)
  row, col = int(order[-2]), int(order[-1])
  if shape[row] < min_dim_size_to_factor:
    return FactorRule()
  return FactorRule((), (row,), (col,))


def factor_rules(params, logical_axes=None, *, min_dim_size_to_factor: int = 128):
  """A `FactorRule` per parameter.

  Parameters with a batch axis or more than two dims are factored as their
  axis names say (t5x: no minimum size, so small expert weights factor too);
  other matrices by the classic two-largest-dims rule with
  `min_dim_size_to_factor`; vectors never.

  Args:
    params: the boxed tree from `model.init(...)["params"]` (leaves
      `nn.LogicallyPartitioned`, arrays or ShapeDtypeStructs inside), or a
      plain tree of arrays.
    logical_axes: for a plain tree, its axis names as `nn.get_partition_spec`
      gives them (a tree of PartitionSpec); optional for 1-D and 2-D trees.
    min_dim_size_to_factor: matrices with a smaller dim stay unfactored.

  Returns:
    A tree shaped like the unboxed params with `FactorRule` leaves.
  """
  if logical_axes is not None:
    specs = jax.tree.leaves(logical_axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(params))
    if len(specs) != len(flat):
      raise ConfigError(f"logical_axes has {len(specs)} leaves but params {len(flat)}")
    rules = [_rule(path, leaf.shape, tuple(spec or ()), min_dim_size_to_factor)
             for (path, leaf), spec in zip(flat, specs)]
    return jax.tree.unflatten(treedef, rules)

  def one(path, leaf):
    if _is_boxed(leaf):
      return _rule(path, leaf.value.shape, leaf.names, min_dim_size_to_factor)
    return _rule(path, leaf.shape, None, min_dim_size_to_factor)
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_boxed)


class AdafactorState(NamedTuple):
  """Adafactor's state; every field but `count` is shaped like the params.

  For a factored parameter, `v_row` is the parameter's shape with its
  column dims reduced to 1 (an expert weight [E, d, f]: [E, d, 1]) and
  `v_col` with its row dims reduced to 1 ([E, 1, f]); `v` is a <float32>[]
  placeholder. For an unfactored one, `v` has the parameter's shape and the
  other two are placeholders. Keeping the reduced axes (size 1) lets every
  statistic take its parameter's sharding, axis for axis, with no guessing
  which axis went (`partitioning.shardings_like_params`).
  """
  count: Array  # <int32>[] updates applied so far
  v_row: Any
  v_col: Any
  v: Any
  m: Any  # momentum, like params; None without momentum


def _placeholder() -> Array:
  return jnp.zeros((), jnp.float32)


def _zeros_without(param, dims: tuple[int, ...]) -> Array:
  """Zeros shaped like `param` with `dims` reduced to size 1."""
  shape = tuple(1 if i in dims else s for i, s in enumerate(param.shape))
  return jnp.zeros(shape, jnp.float32)


def decay_rate_pow(step: Array, exponent: float = 0.8) -> Array:
  """The second-moment decay 1 - (step + 1)^-exponent (step counts from 0)."""
  return 1.0 - (jnp.asarray(step, jnp.float32) + 1.0) ** -exponent


def _normalized_update(rule: FactorRule, grad: Array, v_row, v_col, v, beta: Array,
                       epsilon1: float, clipping_threshold: Optional[float]):
  """The gradient divided by its estimated RMS, clipped; new statistics."""
  grad = grad.astype(jnp.float32)
  grad_sqr = grad * grad + epsilon1
  if rule.factored:
    v_row = beta * v_row + (1.0 - beta) * jnp.mean(grad_sqr, axis=rule.col, keepdims=True)
    v_col = beta * v_col + (1.0 - beta) * jnp.mean(grad_sqr, axis=rule.row, keepdims=True)
    row, col = v_row, v_col
    # The rank-1 fit of the squared gradients: each row's share of the
    # total times the column mean.
    row_share = row / jnp.mean(row, axis=rule.row, keepdims=True)
    update = grad * row_share ** -0.5 * col ** -0.5
  else:
    v = beta * v + (1.0 - beta) * grad_sqr
    update = grad * v ** -0.5
  if clipping_threshold is not None:
    # Early on the statistics lag the gradient; clipping the update's RMS
    # keeps a sudden large gradient from taking an oversized step.
    axes = rule.averaging_dims(grad.ndim)
    rms = jnp.sqrt(jnp.mean(update * update, axis=axes, keepdims=True))
    update = update / jnp.maximum(1.0, rms / clipping_threshold)
  return update, v_row, v_col, v


# pylint: disable-next=redefined-outer-name
def adafactor(learning_rate: ScalarOrSchedule, *, factor_rules,
              decay_rate: float = 0.8, step_offset: int = 0, epsilon1: float = 1e-30,
              epsilon2: float = 1e-3, clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True, momentum: Optional[float] = None,
              weight_decay_rate: Optional[float] = None) -> optax.GradientTransformation:
  """Adafactor with per-parameter factoring rules, as an optax transformation.

  Per parameter p with gradient g (all means per batch entry of its rule):
  v <- beta_t v + (1 - beta_t)(g^2 + epsilon1), factored or not, with
  beta_t = decay_rate_pow(step - step_offset, decay_rate); u = g / sqrt(v),
  divided by max(1, RMS(u) / clipping_threshold); scaled by the learning
  rate and, if multiply_by_parameter_scale, by max(RMS(p), epsilon2); then
  momentum (an EMA of the scaled updates) and decoupled weight decay
  (weight_decay_rate * p per step, not scaled by the learning rate, as in
  t5x). Needs `params` in `update`.

  Args:
    learning_rate: a float or a schedule of the step.
    factor_rules: the tree `factor_rules(...)` returns for these params.
    decay_rate: the exponent of the decay schedule (t5x's name), not a beta.
    step_offset: subtracted from the step in the decay, to restart the
      statistics' warm-up when fine-tuning from a pretrained state.
    epsilon1: added to squared gradients.
    epsilon2: the smallest parameter scale (zero-initialized weights move).
    clipping_threshold: the largest update RMS; None: no clipping.
    multiply_by_parameter_scale: relative steps (t5x's default for T5).
    momentum: beta1 of an optional momentum; None: none (no memory).
    weight_decay_rate: optional decoupled weight decay.
  """
  rules_tree = factor_rules

  def check(params):
    if jax.tree.structure(params) != jax.tree.structure(rules_tree):
      raise ConfigError("adafactor: factor_rules were built for a different parameter tree; "
                        "build them from the boxed params of the model being trained")
    for (path, p), rule in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                               jax.tree.leaves(rules_tree)):
      used = rule.batch + rule.row + rule.col
      if used and (max(used) >= p.ndim or (rule.factored and len(used) != p.ndim)):
        raise ConfigError(f"adafactor: rule {rule} does not fit {jax.tree_util.keystr(path)} "
                          f"of shape {p.shape}")

  def init_fn(params):
    check(params)
    def stat(field):
      def make(rule, p):
        if rule.factored:
          if field == "v":
            return _placeholder()
          return _zeros_without(p, rule.col if field == "v_row" else rule.row)
        return jnp.zeros(p.shape, jnp.float32) if field == "v" else _placeholder()
      return jax.tree.map(make, rules_tree, params)
    m = None if momentum is None else jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                                                   params)
    return AdafactorState(jnp.zeros((), jnp.int32), stat("v_row"), stat("v_col"), stat("v"), m)

  def update_fn(grads, state, params=None):
    if params is None:
      raise ConfigError("adafactor needs the params in update() (for the parameter scale)")
    beta = decay_rate_pow(state.count - step_offset, decay_rate)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    out = jax.tree.map(
        lambda r, g, vr, vc, v: _normalized_update(r, g, vr, vc, v, beta, epsilon1,
                                                   clipping_threshold),
        rules_tree, grads, state.v_row, state.v_col, state.v)
    field = lambda i: jax.tree.map(lambda _, o: o[i], rules_tree, out)

    def scale(rule, u, p):
      if not multiply_by_parameter_scale:
        return lr * u
      axes = rule.averaging_dims(p.ndim)
      p = p.astype(jnp.float32)
      return lr * u * jnp.maximum(jnp.sqrt(jnp.mean(p * p, axis=axes, keepdims=True)), epsilon2)
    updates = jax.tree.map(scale, rules_tree, field(0), params)
    m = state.m
    if momentum is not None:
      m = jax.tree.map(lambda m, u: momentum * m + (1.0 - momentum) * u, state.m, updates)
      updates = m
    if weight_decay_rate is not None:
      updates = jax.tree.map(lambda u, p: u + weight_decay_rate * p, updates, params)
    updates = jax.tree.map(lambda u, p: (-u).astype(p.dtype), updates, params)
    new_state = AdafactorState(optax.safe_increment(state.count), field(1), field(2), field(3), m)
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


# Learning-rate schedules: functions of the step (0 for the first update).

def rsqrt_schedule(base: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
  """base / sqrt(max(step, warmup_steps)): flat at base / sqrt(warmup_steps)
  for the first steps (T5's "warmup"), then inverse square root decay."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return base / jnp.sqrt(jnp.maximum(step, float(warmup_steps)))
  return schedule


def constant(value: float) -> Schedule:
  """The fine-tuning schedule (SPEC: 1e-3)."""
  return lambda step: jnp.full((), value, jnp.float32)


def warmup_decay(peak: float, warmup_steps: int, total_steps: int, *, decay: str = "cosine",
                 end_value: float = 0.0) -> Schedule:
  """Linear warmup from 0 to `peak`, then linear or cosine decay to
  `end_value` at `total_steps` (flat after)."""
  if decay not in ("linear", "cosine"):
    raise ConfigError(f"decay must be 'linear' or 'cosine', got {decay!r}")
  if not 0 <= warmup_steps < total_steps:
    raise ConfigError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, end_value)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup_steps),
       optax.linear_schedule(peak, end_value, total_steps - warmup_steps)], [warmup_steps])


def make_optimizer(name: str, learning_rate: ScalarOrSchedule, *, boxed_params=None,
                   grad_clip_norm: Optional[float] = None, weight_decay: float = 0.0,
                   momentum: Optional[float] = None, **kwargs) -> optax.GradientTransformation:
  """The training optimizer: optional global-norm gradient clipping, then
  Adafactor or AdamW. The optimizer's own state is the chain's last entry.

  Args:
    name: 'adafactor' or 'adam'.
    learning_rate: a float or a schedule.
    boxed_params: for 'adafactor', the boxed params (or their eval_shape)
      from `model.init`, whose axis names give the factor rules.
    grad_clip_norm: clip gradients to this global norm first; None: off.
    weight_decay: Adafactor: decoupled, per step, not scaled by the learning
      rate (t5x); Adam: optax.adamw's, scaled by the learning rate.
    momentum: Adafactor's beta1 (None: none); Adam's b1 (None: 0.9).
    **kwargs: passed on to `adafactor` or `optax.adamw`.
  """
  if name == "adafactor":
    if boxed_params is None:
      raise ConfigError("make_optimizer('adafactor') needs boxed_params (model.init's params "
                        "before nn.unbox) to decide how each parameter is factored")
    kwargs.setdefault("factor_rules", factor_rules(boxed_params))
    opt = adafactor(learning_rate, momentum=momentum,
                    weight_decay_rate=weight_decay or None, **kwargs)
  elif name == "adam":
    opt = optax.adamw(learning_rate, b1=0.9 if momentum is None else momentum,
                      weight_decay=weight_decay, **kwargs)
  else:
    raise ConfigError(f"unknown optimizer {name!r}; use 'adafactor' or 'adam'")
  clip = [] if grad_clip_norm is None else [optax.clip_by_global_norm(grad_clip_norm)]
  return optax.chain(*clip, opt)
