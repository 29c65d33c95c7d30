"""The real train step compiled for a TPU slice on a machine with no TPU:
what the TPU compiler says it needs and does.

`compile_for_topology` compiles the trainer's step (`compiled.compile_step`)
for a `tpu.Topology`'s abstract devices and reads the executable:
per-device HBM (arguments, outputs not aliased to a donated input,
temporaries, the code itself) against the chip's, the cost model's FLOPs
and its step-time estimate (`cost_analysis()['optimal_seconds']`: an
estimate of a compiler model, not a measurement), and the collectives of
the TPU HLO: every all-to-all (dtype, bytes sent) and any all-gather or
reduce-scatter of expert weights (which expert parallelism should never
need: each device keeps its experts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
from jax.sharding import AxisType

from switch_jax import partitioning
from switch_jax.config import ModelConfig
from switch_jax.errors import ConfigError
from switch_jax.model.moe.switch_layer import auto_dispatch
from switch_jax.planning import analytic, compiled as compiled_step, tpu

# One parser of HLO collectives serves the CPU figures and these.
Collective = compiled_step.Collective
hlo_collectives = compiled_step.hlo_collectives


def is_expert_weight_shape(shape: Sequence[int], config: ModelConfig,
                           model_shards: int = 1) -> bool:
  """An expert weight of one Switch layer, all experts or some: [k,
  d_model, f] or [k, f, d_model] where k divides num_experts (k = 1 too:
  one expert per device, as the HLO keeps it) and f is one device's share
  of d_ff (d_ff / model shards); other size-1 dims are ignored when k > 1.
  Dense FFN weights are rank 2; attention weights are [d_model, heads,
  head_dim] or [heads, head_dim, d_model], so they match only in a config
  whose heads divide num_experts and whose head_dim is the FFN width."""
  if not config.num_experts:
    return False
  d, f = config.d_model, -(-config.d_ff // model_shards)
  squeezed = tuple(s for s in shape if s != 1)
  candidates = [tuple(shape)] + ([squeezed] if squeezed[:1] > (1,) else [])
  return any(len(dims) == 3 and config.num_experts % dims[0] == 0
             and dims[1:] in ((d, f), (f, d)) for dims in candidates)


def tpu_dispatch(config: ModelConfig, mesh_shape: Sequence[int]) -> ModelConfig:
  """`config` with dispatch 'auto' resolved for TPU. Compiling here runs
  on a CPU host, so the layer's 'auto' would pick XLA:CPU's kernels;
  the step for a TPU must be traced with TPU's (switch_layer.auto_dispatch)."""
  if config.dispatch != "auto" or not config.is_moe:
    return config
  routers = {config.stack_router(False), config.stack_router(True)}
  kernels = {auto_dispatch(r, "tpu", mesh_shape[1] > 1) for r in routers}
  if len(kernels) > 1:
    raise ConfigError(f"routers {sorted(routers)} take different TPU kernels {sorted(kernels)}; "
                      f"--set dispatch=... cannot serve both, so compile each router alone")
  return config.replace(dispatch=kernels.pop())


def tpu_mesh(shape: Sequence[int], devices: list, topology: tpu.Topology):
  """A (data, expert, model) mesh laid on the slice's torus; over several
  slices the data axis spans them (data-center network) and expert and
  model stay inside one (ICI)."""
  axes = partitioning.MESH_AXES
  kinds = (AxisType.Auto,) * 3
  if topology.num_slices == 1:
    return jax.make_mesh(tuple(shape), axes, axis_types=kinds, devices=devices)
  data, expert, model = shape
  if data % topology.num_slices:
    raise ConfigError(f"mesh {tuple(shape)} over {topology.num_slices} slices: the data axis "
                      f"({data}) must be a multiple of the slices")
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  grid = mesh_utils.create_hybrid_device_mesh(
      (data // topology.num_slices, expert, model), (topology.num_slices, 1, 1), devices=devices)
  return jax.sharding.Mesh(grid, axes, axis_types=kinds)


@dataclasses.dataclass(frozen=True)
class TpuStep:
  """The TPU-compiled step's per-device figures (bytes unless named)."""
  topology: str
  device_kind: str
  mesh_shape: tuple
  dispatch: str
  compile_seconds: float
  memory: compiled_step.CompiledMemory
  hbm_bytes: int
  flops: float  # per device, the cost model's count (all ops)
  bytes_accessed: float
  optimal_seconds: Optional[float]  # cost_analysis 'optimal_seconds' (None: <= 0, none)
  model_flops: float  # per device: the analytic planner's matmul FLOPs (3x forward)
  peak_flops: float  # per device (chip), bfloat16
  hbm_bytes_per_s: float
  all_to_alls: tuple  # Collective per all-to-all
  expert_weight_gathers: tuple  # all-gathers / reduce-scatters of expert weights
  expert_weight_all_reduces: int  # expert gradients summed over data replicas

  @property
  def step_bytes(self) -> int:
    """The step's peak of live buffers per chip: the TPU compiler's own
    peak (`peak_memory_in_bytes`, which counts the arguments; it reports
    `temp_size_in_bytes` as 0 for many programs), or arguments + outputs
    not written in place + temporaries where that is larger."""
    return max(self.memory.peak_bytes, self.memory.compiler_peak_bytes)

  @property
  def temporaries_bytes(self) -> int:
    """The peak beyond the arguments and the outputs not written in place."""
    m = self.memory
    return self.step_bytes - m.argument_bytes - (m.output_bytes - m.alias_bytes)

  @property
  def used_bytes(self) -> int:
    """HBM the step needs: its peak of live buffers and the program,
    which a TPU also keeps in HBM."""
    return self.step_bytes + self.memory.generated_code_bytes

  @property
  def fits(self) -> bool:
    return self.used_bytes <= self.hbm_bytes

  @property
  def all_to_all_bytes(self) -> int:
    """Sent per device per step: (n - 1)/n of each all-to-all's buffer."""
    return sum(c.sent_bytes for c in self.all_to_alls)

  @property
  def all_to_all_dtypes(self) -> dict:
    counts = {}
    for c in self.all_to_alls:
      for dtype, _ in c.arrays:
        counts[dtype] = counts.get(dtype, 0) + 1
    return counts

  @property
  def roofline_seconds(self) -> float:
    """The step's time if it ran at the chip's peak FLOP/s or its HBM
    bandwidth, whichever binds, on the compiler's counts of FLOPs and bytes
    accessed. Communication is not in it (ICI time overlaps or adds), and
    XLA counts a while loop's body once, so a looped kernel reads low."""
    return max(self.flops / self.peak_flops, self.bytes_accessed / self.hbm_bytes_per_s)

  @property
  def estimated_seconds(self) -> float:
    """The ESTIMATED step time: the compiler's cost model where it gives
    one (positive `optimal_seconds`; for full-size steps libtpu 0.0.42
    returns a negative number), else `roofline_seconds`."""
    return self.optimal_seconds or self.roofline_seconds

  @property
  def estimate_source(self) -> str:
    return "optimal_seconds" if self.optimal_seconds else "roofline"

  @property
  def mfu(self) -> Optional[float]:
    """Model FLOPs utilization at the ESTIMATED step time."""
    if not self.estimated_seconds:
      return None
    return self.model_flops / (self.estimated_seconds * self.peak_flops)

  def to_dict(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["memory"] = self.memory.to_dict()
    out["all_to_alls"] = [dataclasses.asdict(c) for c in self.all_to_alls]
    out["expert_weight_gathers"] = [dataclasses.asdict(c) for c in self.expert_weight_gathers]
    out.update(roofline_seconds=self.roofline_seconds, estimated_seconds=self.estimated_seconds,
               estimate_source=self.estimate_source, step_bytes=self.step_bytes,
               temporaries_bytes=self.temporaries_bytes, used_bytes=self.used_bytes,
               fits=self.fits, all_to_all_bytes=self.all_to_all_bytes,
               all_to_all_dtypes=self.all_to_all_dtypes, mfu=self.mfu,
               estimate_note="estimated_seconds and mfu are estimates (the TPU compiler's "
                             "optimal_seconds, or a roofline on its FLOP and byte counts), "
                             "not from a run")
    return out


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _estimate(cost: dict) -> Optional[float]:
  """The cost model's step time, None where it has none: over several
  slices, and for full-size steps, libtpu 0.0.42 returns a negative number."""
  seconds = cost.get("optimal_seconds")
  return float(seconds) if seconds is not None and seconds > 0 else None


def compile_for_topology(config: ModelConfig, topology: tpu.Topology,
                         mesh_shape: Optional[Sequence[int]] = None, *, batch_size: int,
                         input_length: int = 512, target_length: int = 114,
                         optimizer: str = "adafactor", num_microbatches: int = 1,
                         devices: Optional[list] = None) -> TpuStep:
  """Compiles the train step for `topology` (abstract devices, nothing
  allocated) and reads memory, cost and collectives. `mesh_shape` defaults
  to `tpu.default_mesh_shape`; a -1 takes the remaining devices."""
  devices = tpu.topology_devices(topology) if devices is None else devices
  shape = tpu.default_mesh_shape(config.num_experts, topology) if mesh_shape is None else (
      tuple(int(s) for s in mesh_shape))
  shape = partitioning.resolve_mesh_shape(shape, len(devices))
  if math.prod(shape) != len(devices):
    raise ConfigError(f"mesh {shape} has {math.prod(shape)} devices; {topology.name} has "
                      f"{len(devices)}: use all of them (a -1 fills the data axis)")
  config = tpu_dispatch(config, shape)
  mesh = tpu_mesh(shape, devices, topology)
  step = compiled_step.compile_step(
      config, shape, batch_size=batch_size, input_length=input_length,
      target_length=target_length, optimizer=optimizer, num_microbatches=num_microbatches,
      devices=devices, mesh=mesh)
  memory = compiled_step.memory_of(step, num_microbatches)
  cost = _cost(step.compiled)
  collectives = hlo_collectives(step.compiled.as_text())
  plan = analytic.plan(config, shape, batch_size=batch_size, input_length=input_length,
                       target_length=target_length, optimizer=optimizer,
                       num_microbatches=num_microbatches)
  expert = lambda c: any(is_expert_weight_shape(s, config, shape[2]) for _, s in c.arrays)
  return TpuStep(
      topology=topology.name, device_kind=devices[0].device_kind, mesh_shape=shape,
      dispatch=config.dispatch, compile_seconds=step.seconds, memory=memory,
      hbm_bytes=topology.hbm_bytes, flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      optimal_seconds=_estimate(cost),
      model_flops=plan.train_flops_per_step / plan.num_devices, peak_flops=topology.peak_flops,
      hbm_bytes_per_s=topology.hbm_bytes_per_s,
      all_to_alls=tuple(c for c in collectives if c.op == "all-to-all"),
      expert_weight_gathers=tuple(c for c in collectives
                                  if c.op in ("all-gather", "reduce-scatter") and expert(c)),
      expert_weight_all_reduces=sum(
          1 for c in collectives if c.op == "all-reduce" for _, s in c.arrays
          if is_expert_weight_shape(s, config, shape[2])))
