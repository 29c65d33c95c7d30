"""The real sharded train step, compiled on local (e.g. emulated CPU)
devices, or a TPU topology's abstract devices (tpu_compile.py), from
abstract inputs: XLA's memory analysis and the all-to-alls of the
optimized HLO and of the StableHLO handed to XLA. The step is the
trainer's, with the trainer's optimizer (`optimizers.make_optimizer`), so
its state is what a run allocates. tests/planning/test_plan.py holds the
analytic plan (`analytic.plan`) to these figures.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from switch_jax import partitioning
from switch_jax.config import ModelConfig
from switch_jax.errors import ConfigError
from switch_jax.model import param_count
from switch_jax.model.encoder_decoder import EncoderDecoder
from switch_jax.planning.analytic import OPTIMIZERS
from switch_jax.training import optimizers
from switch_jax.training import train_step as ts


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """The compiled step's per-device figures.

  `param_bytes`/`optimizer_bytes` sum one device's shards of the abstract
  sharded state (the step counter is in `optimizer_bytes`, as in `Plan`);
  the rest is XLA's memory analysis. `all_to_all_bytes` is what each
  device sends, read from the optimized HLO; XLA:CPU upcasts bfloat16
  collectives to float32, so on CPU a bfloat16 model reads twice its
  bytes there, while `program_all_to_all_bytes`, read from the StableHLO
  handed to XLA, keeps the program's dtype (what TPU and GPU send).
  """
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  param_bytes: int
  optimizer_bytes: int
  batch_bytes: int
  num_all_to_alls: int
  all_to_all_bytes: int
  program_all_to_all_bytes: int
  generated_code_bytes: int = 0  # the executable itself (on TPU it sits in HBM too)
  compiler_peak_bytes: int = 0  # the compiler's own peak, where it reports one (TPU)

  @property
  def peak_bytes(self) -> int:
    """Arguments, outputs not written in place of a donated input, temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), peak_bytes=self.peak_bytes)


# Element bytes, as HLO and StableHLO spell the types.
ITEMSIZE = {"pred": 1, "i1": 1, "s8": 1, "i8": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4,
             "i32": 4, "u32": 4, "ui32": 4, "f64": 8, "s64": 8, "i64": 8}


_TYPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")  # bf16[4,2,320]
_COLLECTIVES = ("all-to-all", "all-gather", "all-gather-start", "reduce-scatter",
                "all-reduce", "all-reduce-start")


def group_size(line: str) -> int:
  """Participants per replica group of an HLO collective: listed groups
  (`{{0,1},{2,3}}`), iota groups (`[groups, size]<=[devices]`), or the mesh
  spelling, `replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}` (XLA:CPU)
  or `replica_groups=mesh[...], device_ids=(...) {'axis_0'}` (TPU): the
  product of the axes named in braces."""
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if listed:
    return len(listed.group(1).split(","))
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", line)  # [groups, size]<=[devices]
  if iota:
    return int(iota.group(1).split(",")[-1])
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]", line)
  named = (re.search(r"replica_groups=mesh\[[^\]]*\]\s*\{([^}]*)\}", line)
           or re.search(r"\)\s*\{([^}]*)\}", line))
  if mesh and named:
    sizes = dict((k, int(v)) for k, v in re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    return math.prod(sizes[name] for name in re.findall(r"'(\w+)'", named.group(1)))
  raise ValueError(f"cannot read the replica groups of: {line[:200]}")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of the HLO: its op, result arrays (dtype, shape) and
  participants per group."""
  op: str
  arrays: tuple  # ((dtype, shape), ...)
  group_size: int
  source: str  # the JAX op it came from (HLO metadata), for a reader

  @property
  def bytes(self) -> int:
    return sum(ITEMSIZE[t] * math.prod(s) for t, s in self.arrays)

  @property
  def sent_bytes(self) -> int:
    """What one device sends of an all-to-all: (n - 1)/n of its buffer."""
    return self.bytes * (self.group_size - 1) // max(self.group_size, 1)


def hlo_collectives(hlo: str) -> list[Collective]:
  """Every collective instruction of optimized HLO text ('-start' halves
  of async pairs stand for the pair; '-done' is skipped)."""
  found = []
  for line in hlo.splitlines():
    op = next((name for name in _COLLECTIVES if f" {name}(" in line), None)
    if op is None or "=" not in line:
      continue
    result = line.split(f" {op}(")[0].split("=", 1)[1]
    arrays = tuple((t, tuple(int(x) for x in dims.split(",") if x))
                   for t, dims in _TYPE.findall(result) if t in ITEMSIZE)
    if op.endswith("-start") and len(arrays) > 1:
      arrays = arrays[len(arrays) // 2:]  # (operands, results): keep the results
    source = re.search(r'op_name="([^"]*)"', line)
    found.append(Collective(op.removesuffix("-start"), arrays, group_size(line),
                            source.group(1) if source else ""))
  return found


def hlo_all_to_all_bytes(hlo: str) -> tuple[int, int]:
  """(number of all-to-alls, bytes sent per device) in optimized HLO text.

  XLA:CPU splits an all-to-all into a tuple of one piece per peer: the
  pieces add up to the whole buffer, of which (n - 1)/n leaves the device.
  """
  all_to_alls = [c for c in hlo_collectives(hlo) if c.op == "all-to-all"]
  return len(all_to_alls), sum(c.sent_bytes for c in all_to_alls)


def stablehlo_all_to_all_bytes(text: str, num_expert_shards: int) -> int:
  """Bytes sent per device by the all-to-alls of StableHLO text (per-device
  shapes inside shard_map), in the program's dtypes."""
  n = num_expert_shards
  return sum(math.prod(int(x) for x in dims.split("x")) * ITEMSIZE[dtype] * (n - 1) // n
             for dims, dtype in re.findall(r"all_to_all.*-> tensor<([\dx]+)x(\w+)>", text))


@dataclasses.dataclass
class CompiledStep:
  """The lowered and compiled train step with its abstract inputs."""
  lowered: object
  compiled: object
  state: object
  batch: dict
  mesh_shape: tuple
  seconds: float  # wall time of lower + compile


def compile_step(config: ModelConfig, mesh_shape: Sequence[int], *, batch_size: int,
                 input_length: int, target_length: int, optimizer: str = "adafactor",
                 num_microbatches: int = 1, devices=None, mesh=None) -> CompiledStep:
  """Lowers and compiles the real sharded train step from abstract inputs
  (nothing is allocated, so `devices` may be a TPU topology's abstract
  devices) on `mesh`, or on a mesh of `mesh_shape` over `devices`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(int(s) for s in mesh_shape)
  size = math.prod(shape) if -1 not in shape else len(devices)
  if size > len(devices):
    raise ConfigError(f"mesh {shape} needs {size} devices but {len(devices)} are local; "
                      f"emulate more CPU devices or plan without compiling")
  shape = partitioning.resolve_mesh_shape(shape, size)
  partitioning.check_fits(config, shape, batch_size)
  if optimizer not in OPTIMIZERS:
    raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
  start = time.perf_counter()
  model = EncoderDecoder(config)
  # The learning rate changes no shape or byte.
  opt = optimizers.make_optimizer(optimizer, 1e-3,
                                  boxed_params=param_count.abstract_params(config))
  mesh = partitioning.make_mesh(shape, devices[:size]) if mesh is None else mesh
  lengths = (input_length, target_length)
  with jax.set_mesh(mesh):
    shardings = ts.state_shardings(model, opt, mesh, batch_size, lengths)
    abstract = jax.eval_shape(ts.init_fn(model, opt, batch_size, lengths), ts.RNG_SHAPE)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
    tokens = partitioning.batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=tokens)
             for name, length in (("encoder_input_tokens", input_length),
                                  ("decoder_input_tokens", target_length),
                                  ("decoder_target_tokens", target_length))}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=partitioning.replicated(mesh))
    step = ts.make_train_step(model, opt, mesh, shardings, num_microbatches=num_microbatches)
    lowered = step.lower(state, batch, rng)
    compiled = lowered.compile()
  return CompiledStep(lowered, compiled, state, batch, shape, time.perf_counter() - start)


def memory_of(step: CompiledStep, num_microbatches: int = 1) -> CompiledMemory:
  """The per-device figures of a compiled step."""
  shard_bytes = lambda tree: sum(
      math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  stats = step.compiled.memory_analysis()
  count, sent = hlo_all_to_all_bytes(step.compiled.as_text())
  # With microbatches every all-to-all sits in the scan's body, which the
  # HLO lists once and runs `num_microbatches` times.
  return CompiledMemory(
      argument_bytes=stats.argument_size_in_bytes, output_bytes=stats.output_size_in_bytes,
      alias_bytes=stats.alias_size_in_bytes, temp_bytes=stats.temp_size_in_bytes,
      param_bytes=shard_bytes(step.state.params),
      optimizer_bytes=shard_bytes(step.state.opt_state) + shard_bytes(step.state.step),
      batch_bytes=shard_bytes(step.batch), num_all_to_alls=count,
      all_to_all_bytes=sent * num_microbatches,
      program_all_to_all_bytes=num_microbatches * stablehlo_all_to_all_bytes(
          step.lowered.as_text(), step.mesh_shape[1]),
      generated_code_bytes=stats.generated_code_size_in_bytes,
      compiler_peak_bytes=getattr(stats, "peak_memory_in_bytes", 0) or 0)


def compiled_memory(config: ModelConfig, mesh_shape: Sequence[int], *, batch_size: int,
                    input_length: int, target_length: int, optimizer: str = "adafactor",
                    num_microbatches: int = 1, devices=None) -> CompiledMemory:
  """Compiles the real sharded train step on `devices` (default: the local
  ones; abstract TPU devices work too) from abstract inputs and reads what
  the compiler reports."""
  step = compile_step(config, mesh_shape, batch_size=batch_size, input_length=input_length,
                      target_length=target_length, optimizer=optimizer,
                      num_microbatches=num_microbatches, devices=devices)
  return memory_of(step, num_microbatches)
