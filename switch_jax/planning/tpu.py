"""TPU slices by name, for compiling the train step ahead of time on a
machine with no TPU (libtpu, from `pip install -e ".[tpu]"`, compiles for
a topology it is told about: `jax.experimental.topologies`).

  parse_topology("v5e-16")      # 16 v5e chips, libtpu topology "v5e:4x4"
  parse_topology("2xv5p-128")   # two v5p slices of 64 chips, over DCN
  devices = topology_devices(parse_topology("v4-8"))  # 4 abstract v4 chips

Names are GCP's accelerator types: v5e-N and v6e-N count chips; v4-N and
v5p-N count TensorCores (two per chip, run as one "megacore" device), so
they hold N/2 chips. A libtpu topology string ("v5e:4x4", "v4:2x2x2") is
accepted too. The chip table gives what a compile cannot: HBM per chip and
the peak bfloat16 rate, for "fits" and utilization.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from typing import Optional

from switch_jax.errors import UserError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation. HBM size and bandwidth and peak bfloat16 FLOP/s
  per chip are Google Cloud's published figures (each row cites its page);
  the pages say "GB" for the size, and HBM stacks are binary sizes, so it
  is taken as GiB; the bandwidth is GB/s (10^9)."""
  name: str
  device_kind: str  # what jax reports for a device of this chip
  hbm_gib: float
  peak_bf16_tflops: float
  hbm_gb_per_s: float
  topology_prefix: str  # libtpu's spelling in a topology name
  chip_config: str  # 'megacore': both TensorCores of a chip as one device
  dims: int  # 2D torus (v5e, v6e) or 3D (v4, v5p)
  cores_in_name: bool  # the accelerator type counts TensorCores, not chips


CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2 at 1200 GB/s.
    "v4": Chip("v4", "TPU v4", 32, 275, 1200, "v4", "megacore", 3, True),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GB HBM2 at 819 GB/s.
    "v5e": Chip("v5e", "TPU v5 lite", 16, 197, 819, "v5e", "default", 2, False),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GB HBM2e at 2765 GB/s.
    "v5p": Chip("v5p", "TPU v5", 95, 459, 2765, "v5", "megacore", 3, True),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB HBM at 1640 GB/s.
    "v6e": Chip("v6e", "TPU v6 lite", 32, 918, 1640, "v6e", "default", 2, False),
}
# GCP's other spellings of the same chips.
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """`num_slices` slices (joined over the data-center network) of `shape`
  chips each."""
  chip: Chip
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_devices(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def topology_name(self) -> str:
    """libtpu's name, e.g. 'v5e:4x4'."""
    return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def name(self) -> str:
    """GCP's accelerator type, e.g. 'v5e-16', '2xv4-64'."""
    count = self.chips_per_slice * (2 if self.chip.cores_in_name else 1)
    return f"{self.num_slices}x" * (self.num_slices > 1) + f"{self.chip.name}-{count}"

  @property
  def hbm_bytes(self) -> int:
    return int(self.chip.hbm_gib * GIB)

  @property
  def peak_flops(self) -> float:
    """Peak bfloat16 FLOP/s of one chip (one device)."""
    return self.chip.peak_bf16_tflops * 1e12

  @property
  def hbm_bytes_per_s(self) -> float:
    return self.chip.hbm_gb_per_s * 1e9


def slice_shape(chip: Chip, num_chips: int) -> tuple[int, ...]:
  """The usual slice shape of `num_chips` chips: 2x2(x1) for four, then
  doubling the shortest side (the last of equals), as GCP lays out
  power-of-two slices (v5e-16 is 4x4, v4-64 is 2x4x4, v5p-128 4x4x4)."""
  if num_chips < 1 or num_chips & (num_chips - 1):
    example = "x".join(["4"] * (chip.dims - 1) + ["12"])
    raise UserError(f"{chip.name} with {num_chips} chips: name a power of two, or give the "
                    f"libtpu topology itself, e.g. '{chip.topology_prefix}:{example}'")
  if num_chips < 4:
    shape = [1] * chip.dims
    shape[chip.dims - 1 if num_chips == 2 else 0] = num_chips
    return tuple(shape)
  shape = [2, 2] + [1] * (chip.dims - 2)
  while math.prod(shape) < num_chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return tuple(shape)


def parse_topology(text: str, num_slices: Optional[int] = None) -> Topology:
  """'v5e-16', 'v4-64', 'v5litepod-16', '2xv5e-16' (two slices) or a libtpu
  name such as 'v5e:4x4' -> Topology. `num_slices` (if given) overrides
  an 'Nx' prefix."""
  spec = text.strip().lower()
  prefix = re.match(r"^(\d+)x(?=v)", spec)
  slices = int(prefix.group(1)) if prefix else 1
  spec = spec[prefix.end():] if prefix else spec
  slices = num_slices or slices
  if slices < 1:
    raise UserError(f"--num_slices must be >= 1, got {slices}")
  known = ", ".join(f"{name}-N" for name in CHIPS)
  libtpu = re.match(r"^(v\w+):(\d+(?:x\d+)+)$", spec)
  gcp = re.match(r"^(v\w+?)-(\d+)$", spec)
  if libtpu:
    chip = _chip(libtpu.group(1), text)
    shape = tuple(int(s) for s in libtpu.group(2).split("x"))
    if len(shape) != chip.dims:
      raise UserError(f"topology {text!r}: {chip.name} slices have {chip.dims} dimensions")
  elif gcp:
    chip = _chip(gcp.group(1), text)
    count = int(gcp.group(2))
    if chip.cores_in_name and count % 2:
      raise UserError(f"{text!r}: {chip.name}-N counts TensorCores, two per chip; N is even")
    shape = slice_shape(chip, count // 2 if chip.cores_in_name else count)
  else:
    raise UserError(f"unknown TPU topology {text!r}: use an accelerator type ({known}, "
                    f"e.g. v5e-16; '2xv5e-16' for two slices) or a libtpu name like 'v5e:4x4'")
  return Topology(chip, shape, slices)


def _chip(name: str, text: str) -> Chip:
  name = _ALIASES.get(name, name)
  if name not in CHIPS:
    raise UserError(f"unknown TPU chip in {text!r}: one of {sorted(CHIPS)}")
  return CHIPS[name]


def _prepare_libtpu() -> None:
  """libtpu, loaded on a machine that is no TPU VM, looks for the VM's
  metadata and logs two alarming lines about worker hostnames and host
  bounds, and takes a lockfile that keeps a second process (a test
  worker, another compile) from loading it. Compiling needs none of it:
  say so, unless this is a TPU VM (/dev/accel* or /dev/vfio devices,
  where the lock guards real chips) or the variables are already set."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def install_hint() -> str:
  import jax  # pylint: disable=import-outside-toplevel
  return (f'pip install -e ".[tpu]" (or: pip install "jax[tpu]=={jax.__version__}") '
          f"brings libtpu, which compiles for TPU topologies on any machine")


def topology_devices(topology: Topology) -> list:
  """The slice's abstract devices (nothing runs on them; a jit of
  ShapeDtypeStructs lowers and compiles for them). UserError without libtpu."""
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise UserError(f"--topology needs libtpu, which is not installed: {install_hint()}") from None
  _prepare_libtpu()
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  bounds = tuple(min(2, s) for s in topology.shape[:2]) + (1,)
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.topology_name,
        chip_config_name=topology.chip.chip_config, chips_per_host_bounds=bounds,
        num_slices=topology.num_slices)
  except Exception as err:  # libtpu's own message says what it refused
    raise UserError(f"libtpu cannot describe topology {topology.topology_name} x "
                    f"{topology.num_slices} slice(s): {err}") from None
  devices = list(desc.devices)
  if len(devices) != topology.num_devices:
    raise UserError(f"libtpu gave {len(devices)} devices for {topology.name}, expected "
                    f"{topology.num_devices}")
  return devices


def default_mesh_shape(num_experts: int, topology: Topology) -> tuple[int, int, int]:
  """(data, expert, model) when none is given: experts split over as many
  chips of one slice as divide both (all-to-alls stay on the slice's ICI),
  the rest data parallel, no model parallelism."""
  expert = math.gcd(num_experts, topology.chips_per_slice) if num_experts else 1
  return (topology.num_devices // expert, expert, 1)
