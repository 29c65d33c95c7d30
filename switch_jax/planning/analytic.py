"""Memory, communication and FLOPs of one training step on a device mesh.

`plan` answers from the config and the mesh alone (Switch-C on 2048 chips
in about a second, nothing allocated): per-device bytes of parameters,
optimizer state, gradients and activations, all-to-all bytes, FLOPs.
`compiled.compiled_memory` compiles the real step to check these figures
(tests/planning/test_plan.py holds them to it). Mesh (data, expert, model)
= (D, X, M_): the batch is split over D x X, experts over X (n = X expert
shards), d_ff/heads/vocab over M_.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax

from switch_jax import partitioning
from switch_jax.model import param_count
from switch_jax.model.moe import routing
from switch_jax.config import ModelConfig
from switch_jax.errors import ConfigError
from switch_jax.model.moe.switch_layer import group_layout
from switch_jax.training import optimizers

PARAM_BYTES = 4  # parameters, gradients and optimizer statistics are float32
INT_BYTES = 4  # token ids, step and optimizer counters
GIB = 2 ** 30
OPTIMIZERS = ("adafactor", "adam")
ADAFACTOR_FACTORINGS = ("t5x", "optax")
_OPTAX_MIN_DIM_TO_FACTOR = 128  # optax.adafactor's default


@dataclasses.dataclass(frozen=True)
class ParamLeaf:
  """One parameter: '/'-joined path, shape, logical and mesh axes per dim."""
  path: str
  shape: tuple[int, ...]
  logical_axes: tuple[Optional[str], ...]
  mesh_axes: tuple  # per dim: None, a mesh axis name or a tuple of names

  def shard_elements(self, mesh: dict, dims: Optional[Sequence[int]] = None) -> int:
    """Elements of one device's shard of this leaf, or of the statistic
    that keeps only `dims` (sharded like the parameter on those dims)."""
    def ways(axes):
      return math.prod(mesh[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
    dims = range(len(self.shape)) if dims is None else dims
    return math.prod(-(-self.shape[i] // ways(self.mesh_axes[i])) for i in dims)


def param_leaves(config: ModelConfig) -> tuple[ParamLeaf, ...]:
  """The model's parameters, from `jax.eval_shape` of its init (the model
  itself is the inventory, so a new parameter cannot be missed)."""
  return _param_leaves(config.replace(dtype="float32"))  # shapes do not depend on it


@functools.lru_cache(maxsize=32)
def _param_leaves(config: ModelConfig) -> tuple[ParamLeaf, ...]:
  boxed = param_count.abstract_params(config)
  flat = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  leaves = []
  for path, box in flat:
    names = tuple(box.names)
    mesh_axes = tuple(nn.logical_to_mesh_axes(names, partitioning.LOGICAL_AXIS_RULES))
    leaves.append(ParamLeaf("/".join(str(k.key) for k in path), tuple(box.value.shape), names,
                            mesh_axes))
  return tuple(leaves)


def adafactor_statistics(leaf: ParamLeaf, factoring: str = "t5x"
                         ) -> tuple[list[tuple[int, ...]], int]:
  """The Adafactor assumption, in one place: second moments only (momentum
  off, decay 0.8, as t5x), factored where the rule allows.

  Returns the dims each statistic keeps (sharded like the parameter on
  them) and the number of (1,)-shaped placeholders the state also holds.
  't5x' is the trainer's own Adafactor (`optimizers.factor_rules`, t5x's
  logical rules): 'expert' is a batch dim, 'embed' the row, 'mlp'/'heads'/
  'kv'/'vocab' columns, so an [E, d, f] expert weight keeps [E, d] and
  [E, f] and attention kernels [d, h, k] keep [d] and [h, k].
  'optax' is optax.adafactor's rule (for a run with optax's): factor the two
  largest dims when both are >= 128, so attention kernels stay unfactored.
  """
  dims = tuple(range(len(leaf.shape)))
  if factoring == "optax":
    order = sorted(dims, key=lambda i: (leaf.shape[i], i))
    if len(dims) < 2 or leaf.shape[order[-2]] < _OPTAX_MIN_DIM_TO_FACTOR:
      return [dims], 2  # v; v_row and v_col placeholders
    row, col = order[-2], order[-1]
    # shardings_like_params finds the dropped axis by shape, last axis first.
    kept = []
    for drop in (col, row):
      reduced = leaf.shape[:drop] + leaf.shape[drop + 1:]
      found = next(a for a in reversed(dims) if leaf.shape[:a] + leaf.shape[a + 1:] == reduced)
      kept.append(tuple(i for i in dims if i != found))
    return kept, 1  # v_row, v_col; v placeholder
  if factoring != "t5x":
    raise ConfigError(f"adafactor factoring must be one of {ADAFACTOR_FACTORINGS}")
  boxed = nn.Partitioned(jax.ShapeDtypeStruct(leaf.shape, "float32"), leaf.logical_axes)
  rule = optimizers.factor_rules(boxed)
  if not rule.factored:
    return [dims], 2  # v; v_row and v_col placeholders (AdafactorState)
  # v_row reduces the column dims to 1, v_col the row dims.
  v_row = tuple(i for i in dims if i not in rule.col)
  v_col = tuple(i for i in dims if i not in rule.row)
  return [v_row, v_col], 1  # v placeholder


def optimizer_state_bytes(leaves, mesh: dict, optimizer: str, factoring: str = "t5x") -> int:
  """Per-device bytes of the optimizer state plus the train state's step."""
  counters = 2 * INT_BYTES  # TrainState.step and the optimizer's count
  if optimizer == "adam":
    return counters + 2 * sum(leaf.shard_elements(mesh) for leaf in leaves) * PARAM_BYTES
  if optimizer != "adafactor":
    raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
  total = 0
  for leaf in leaves:
    kept, placeholders = adafactor_statistics(leaf, factoring)
    total += sum(leaf.shard_elements(mesh, dims) for dims in kept) + placeholders
  return counters + total * PARAM_BYTES


@dataclasses.dataclass(frozen=True)
class Routing:
  """One Switch layer's routing per microbatch: `groups` (all devices) of
  `group_tokens` (S) tokens, `capacity` (C) slots per expert and group."""
  name: str
  router: str
  groups: int
  group_tokens: int
  capacity: int  # unused by dropless
  num_experts: int

  @property
  def slots(self) -> int:
    """Expert FFN rows per microbatch: G E C (dropless: the tokens)."""
    per_group = self.group_tokens if self.router == "dropless" else (
        self.num_experts * self.capacity)
    return self.groups * per_group

  @property
  def slots_per_token(self) -> float:
    """Expert work per token, in dense FFNs: E C / S (~ the capacity factor,
    more where the minimum capacity binds)."""
    return self.slots / (self.groups * self.group_tokens)


def switch_layers(config: ModelConfig, micro_batch: int, input_length: int,
                  target_length: int, batch_shards: int) -> list[Routing]:
  """Every Switch layer's groups and train capacity, as SwitchLayer computes them."""
  layers = []
  for stack, count, length in (("encoder", config.num_encoder_layers, input_length),
                               ("decoder", config.num_decoder_layers, target_length)):
    router = config.stack_router(stack == "decoder")
    for i in config.sparse_layers(count):
      tokens = micro_batch * length
      groups, group_tokens = group_layout(tokens, config.group_size or length, batch_shards)
      capacity = routing.expert_capacity(
          group_tokens, config.num_experts, config.train_capacity_factor,
          config.min_expert_capacity, config.expert_capacity)
      layers.append(Routing(f"{stack}/layers_{i}", router, groups, group_tokens, capacity,
                            config.num_experts))
  return layers


def _ffn_matrices(config: ModelConfig) -> int:
  return 3 if config.ffn_activation == "geglu" else 2


def forward_flops(config: ModelConfig, micro_batch: int, input_length: int,
                  target_length: int, batch_shards: int = 1) -> dict[str, int]:
  """Matmul FLOPs (2 per multiply-add) of one forward pass of a microbatch.

  Counted: q/k/v/out projections; attention scores q.k and weights.v over
  every (query, key) pair (the causal half is computed, then masked); the
  dense FFNs; the experts on all E * C slots of every group (so the
  capacity factor's empty slots count: E C / S ~ cf times a dense FFN;
  dropless counts the routed tokens only); the router; the output logits.
  Not counted: norms, softmax, gathers, elementwise ops (< 1% here).
  """
  d, f, v = config.d_model, config.d_ff, config.vocab_size
  inner = config.num_heads * config.head_dim
  enc, dec = micro_batch * input_length, micro_batch * target_length
  ffn_per_token = 2 * d * f * _ffn_matrices(config)
  out = dict(attention_projections=0, attention_scores=0, ffn=0, experts=0, router=0)
  out["attention_projections"] = 2 * d * inner * (4 * enc * config.num_encoder_layers + (
      4 * dec + 2 * dec + 2 * enc) * config.num_decoder_layers)
  out["attention_scores"] = 4 * inner * micro_batch * (
      input_length ** 2 * config.num_encoder_layers
      + (target_length ** 2 + target_length * input_length) * config.num_decoder_layers)
  for count, tokens in ((config.num_encoder_layers, enc), (config.num_decoder_layers, dec)):
    out["ffn"] += (count - len(config.sparse_layers(count))) * tokens * ffn_per_token
  for layer in switch_layers(config, micro_batch, input_length, target_length, batch_shards):
    tokens = layer.groups * layer.group_tokens
    out["router"] += 2 * tokens * d * config.num_experts
    out["experts"] += layer.slots * ffn_per_token
  out["logits"] = 2 * dec * d * v
  return out


def all_to_all_bytes(config: ModelConfig, mesh: dict, micro_batch: int, input_length: int,
                     target_length: int) -> dict[str, int]:
  """Bytes each device sends per microbatch through each Switch layer's
  all-to-alls, forward and backward.

  A capacity router moves its [G_local, E, C, d] buffer (activation dtype)
  four times (dispatch and combine, and their transposes); the 1/n slice
  addressed to the device itself stays local, so (n - 1)/n of it is sent.
  Dropless moves a fixed [n, N, d] buffer (N = the device's tokens) four
  times and its [n, N] int32 expert ids once. 0 without an expert axis.
  """
  n = mesh["expert"]
  shards = mesh["data"] * mesh["expert"]
  itemsize = 2 if config.dtype == "bfloat16" else 4
  out = {}
  for layer in switch_layers(config, micro_batch, input_length, target_length, shards):
    local_groups = layer.groups // shards
    if n == 1:
      out[layer.name] = 0
    elif layer.router == "dropless":
      rows = local_groups * layer.group_tokens
      out[layer.name] = (n - 1) * rows * (4 * config.d_model * itemsize + INT_BYTES)
    else:
      buffer = local_groups * config.num_experts * layer.capacity * config.d_model * itemsize
      out[layer.name] = 4 * buffer * (n - 1) // n
  return out


def activation_bytes(config: ModelConfig, mesh: dict, local_batch: int, input_length: int,
                     target_length: int) -> dict[str, int]:
  """Per-device bytes the backward pass keeps from the forward (no remat),
  for `local_batch` sequences (one microbatch on one device).

  Counted per token and layer, in the activation dtype (a bytes) unless
  float32 is named:
  - per pre-norm sublayer: its normed input in float32 and its output (d);
  - attention: q, k, v and its output (h k / M_ each); the float32 softmax
    (plus its bfloat16 cast) per key (h / M_); in the decoder also the
    cross-attention keys and values of every encoder token;
  - dense FFN: hidden width f / M_, 2 copies for ReLU (pre/post
    activation), 5 for GeGLU (both matmuls, tanh-GELU terms, product);
  - Switch FFN: the float32 router logits and probabilities (E each), two
    [d] for the combine, and per slot (E C / S of them per token; dropless:
    n, the rows of its fixed buffers) two [d] and the hidden copies;
  - the boolean masks and four float32 copies of the logits (logits,
    softmax, log-softmax, their gradient: vocab / M_ each).
  The copy counts are XLA:CPU's, read off the slope of compiled temp bytes
  over layers; XLA:CPU computes bfloat16 in float32, so only float32 runs
  calibrate (tests/planning/test_plan.py holds the totals to the compiled ones).
  """
  a = 2 if config.dtype == "bfloat16" else 4
  model = mesh["model"]
  d, hd = config.d_model, config.head_dim
  heads = -(-config.num_heads // model)
  hidden = -(-config.d_ff // model) * (5 if config.ffn_activation == "geglu" else 2) * a
  vocab = -(-config.vocab_size // model)
  norm = d * (a + 4)
  scores = heads * (4 + (a if a != 4 else 0))  # per key
  qkvo = 4 * heads * hd * a
  enc, dec = local_batch * input_length, local_batch * target_length
  shards = mesh["data"] * mesh["expert"]
  out = dict(encoder=0, decoder=0, logits=0)
  routed = {r.name: r for r in switch_layers(config, local_batch * shards, input_length,
                                              target_length, shards)}
  for stack, count, tokens, length in (("encoder", config.num_encoder_layers, enc, input_length),
                                       ("decoder", config.num_decoder_layers, dec, target_length)):
    for i in range(count):
      per_token = 2 * norm + qkvo + scores * length
      if stack == "decoder":  # cross attention: its norm, q and output, scores
        per_token += norm + qkvo // 2 + scores * input_length
      layer = routed.get(f"{stack}/layers_{i}")
      if layer is None:
        per_token += hidden
      else:
        # Dropless exchanges fixed [n, N, d] buffers: n rows per token.
        slots = mesh["expert"] if layer.router == "dropless" else layer.slots_per_token
        per_token += 2 * config.num_experts * 4 + 2 * d * a + slots * (2 * d * a + hidden)
      out[stack] += int(per_token * tokens)
      if stack == "decoder":
        out[stack] += enc * qkvo // 2  # cross-attention keys and values
    out[stack] += tokens * norm + local_batch * length ** 2  # final norm; mask
  out["decoder"] += local_batch * target_length * input_length  # cross mask
  out["logits"] = dec * vocab * 4 * 4
  return out


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one training step needs on each device (bytes unless named).

  `gradient_bytes` is the float32 gradient tree, twice with microbatches
  (the accumulator and one microbatch's gradients). `total_bytes` is what
  must fit: state, gradients, activations and the batch. FLOPs count
  matmuls (see `forward_flops`); training is taken as 3x the forward
  (the backward computes two matmuls per forward one), the "6 N" rule
  for N active parameters per token.
  """
  mesh_shape: tuple[int, int, int]
  batch_size: int
  input_length: int
  target_length: int
  num_microbatches: int
  optimizer: str
  dtype: str
  num_params: int
  num_expert_params: int
  param_bytes: int
  optimizer_bytes: int
  gradient_bytes: int
  activation_bytes: int
  activation_parts: dict
  batch_bytes: int
  all_to_all_bytes: int  # sent per device per step, forward + backward
  all_to_all_per_layer: dict  # per microbatch
  switch_routing: tuple  # per Switch layer: its Routing (per microbatch, global)
  forward_flops_per_token: float
  forward_flops_parts: dict  # per step
  device_memory_bytes: Optional[int] = None

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh_shape)

  @property
  def total_bytes(self) -> int:
    return (self.param_bytes + self.optimizer_bytes + self.gradient_bytes
            + self.activation_bytes + self.batch_bytes)

  @property
  def train_flops_per_step(self) -> float:
    return 3.0 * sum(self.forward_flops_parts.values())

  @property
  def fits(self) -> Optional[bool]:
    if self.device_memory_bytes is None:
      return None
    return self.total_bytes <= self.device_memory_bytes

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out["switch_routing"] = [dict(dataclasses.asdict(r), slots_per_token=r.slots_per_token)
                             for r in self.switch_routing]
    out.update(num_devices=self.num_devices, total_bytes=self.total_bytes,
               train_flops_per_step=self.train_flops_per_step, fits=self.fits)
    return out


def plan(config: ModelConfig, mesh_shape: Sequence[int], *, batch_size: int,
         input_length: int = 512, target_length: int = 114, optimizer: str = "adafactor",
         num_microbatches: int = 1, num_devices: Optional[int] = None,
         device_memory_gib: Optional[float] = None, adafactor_factoring: str = "t5x") -> Plan:
  """The analytic plan of a train step of `config` on a (data, expert,
  model) mesh. `num_devices` resolves a -1 in `mesh_shape`.

  Raises ConfigError (naming the fix) for a mesh or batch that cannot work.
  """
  shape = tuple(int(s) for s in mesh_shape)
  if num_devices is None:
    if -1 in shape:
      raise ConfigError(f"mesh {shape} has a -1: give the number of devices to resolve it")
    num_devices = math.prod(shape)
  shape = partitioning.resolve_mesh_shape(shape, num_devices)
  partitioning.check_fits(config, shape, batch_size)
  if optimizer not in OPTIMIZERS:
    raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
  shards = shape[0] * shape[1]
  if num_microbatches < 1 or batch_size % (num_microbatches * shards):
    raise ConfigError(f"batch {batch_size} cannot be split into {num_microbatches} microbatches "
                      f"over {shards} batch shards; use a batch that is a multiple of "
                      f"{num_microbatches * shards}")
  mesh = dict(zip(partitioning.MESH_AXES, shape))
  leaves = param_leaves(config)
  param_bytes = sum(leaf.shard_elements(mesh) for leaf in leaves) * PARAM_BYTES
  micro = batch_size // num_microbatches
  local = micro // shards
  activations = activation_bytes(config, mesh, local, input_length, target_length)
  per_layer = all_to_all_bytes(config, mesh, micro, input_length, target_length)
  flops = forward_flops(config, micro, input_length, target_length, shards)
  flops = {k: v * num_microbatches for k, v in flops.items()}
  memory = None if device_memory_gib is None else int(device_memory_gib * GIB)
  return Plan(
      mesh_shape=shape, batch_size=batch_size, input_length=input_length,
      target_length=target_length, num_microbatches=num_microbatches, optimizer=optimizer,
      dtype=config.dtype, num_params=sum(math.prod(leaf.shape) for leaf in leaves),
      num_expert_params=sum(math.prod(leaf.shape) for leaf in leaves
                            if "expert" in leaf.logical_axes),
      param_bytes=param_bytes,
      optimizer_bytes=optimizer_state_bytes(leaves, mesh, optimizer, adafactor_factoring),
      gradient_bytes=param_bytes * (2 if num_microbatches > 1 else 1),
      activation_bytes=sum(activations.values()), activation_parts=activations,
      batch_bytes=(batch_size // shards) * (input_length + 2 * target_length) * INT_BYTES,
      all_to_all_bytes=sum(per_layer.values()) * num_microbatches,
      all_to_all_per_layer=per_layer,
      switch_routing=tuple(switch_layers(config, micro, input_length, target_length, shards)),
      forward_flops_per_token=sum(flops.values()) / (batch_size * (input_length + target_length)),
      forward_flops_parts=flops, device_memory_bytes=memory)
