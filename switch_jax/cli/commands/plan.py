"""`switch-jax plan`: per-device memory, all-to-all traffic and FLOPs of a
train step of a config on a (data, expert, model) mesh.

  switch-jax plan --model switch_c_2048 --mesh_shape 1,2048,1 --batch_size 2048 \\
      --set dtype=bfloat16 --device_memory_gib 32
  switch-jax plan --model tiny_switch --set num_experts=8 --mesh_shape 1,8,1 \\
      --batch_size 8 --input_length 8 --target_length 8 --num_cpu_devices 8 --compile

The plan is analytic, so the mesh may be far larger than this machine.
With --compile (and a mesh that fits the local or --num_cpu_devices CPU
devices) it also compiles the real step and prints XLA's figures beside it.

  switch-jax plan --model switch_base_8 --set dtype=bfloat16 --topology v5e-16 \\
      --batch_size 256

With --topology (a TPU slice: v5e-N, v6e-N chips; v4-N, v5p-N TensorCores;
'2xv5e-16' or --num_slices for several slices) it compiles the real step
for that slice with the TPU compiler (libtpu, `pip install -e ".[tpu]"`;
no TPU needed) and prints its HBM use per chip against the chip's, FLOPs,
the all-to-alls, any all-gather of expert weights and the compiler's
ESTIMATED step time with MFU at it. Without --mesh_shape the mesh is
planning/tpu.py's default: experts over as many chips of a slice as
divide the experts, the rest data parallel.
`--mesh` and `--emulate_devices` are deprecated aliases of `--mesh_shape`
and `--num_cpu_devices` (the spellings of train, eval and infer).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math

from switch_jax.cli.commands import gin_flags
from switch_jax.config import ModelConfig, get_config
from switch_jax.errors import ConfigError, UserError
# Importing JAX starts no backend, so --num_cpu_devices still applies after.
from switch_jax.planning import analytic, compiled as compiled_step, tpu


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", required=True, help="a named config, e.g. switch_c_2048")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a ModelConfig field (repeatable), e.g. dtype=bfloat16")
  gin_flags.add_mesh_argument(parser, default_help=" (required unless --topology)")
  parser.add_argument("--num_devices", type=int,
                      help="devices of the planned system (resolves a -1 in --mesh_shape)")
  parser.add_argument("--batch_size", type=int, required=True, help="global sequences per step")
  parser.add_argument("--input_length", type=int, default=512)
  parser.add_argument("--target_length", type=int, default=114)
  parser.add_argument("--optimizer", choices=("adafactor", "adam"), default="adafactor")
  parser.add_argument("--num_microbatches", type=int, default=1)
  parser.add_argument("--device_memory_gib", type=float, default=None,
                      help="memory per chip (default: the --topology chip's HBM, else 16)")
  parser.add_argument("--compile", action="store_true",
                      help="also compile the step on local devices if the mesh fits them")
  parser.add_argument("--topology", metavar="TPU",
                      help="compile for this TPU slice (v5e-16, v4-64, v5p-128, v6e-8, "
                           "2xv5e-16, or a libtpu name like v5e:4x4); needs the tpu extra")
  parser.add_argument("--num_slices", type=int, default=None,
                      help="slices of --topology joined over the data-center network")
  gin_flags.add_device_arguments(parser)
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def model_config(args) -> ModelConfig:
  """The named config with --set overrides (the one place a gin file will
  feed in later)."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  overrides = {}
  for item in args.set:
    name, sep, text = item.partition("=")
    if not sep or name.strip() not in fields:
      raise UserError(f"--set {item!r}: expected FIELD=VALUE with FIELD a ModelConfig field")
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = text.strip()  # a bare string such as bfloat16
    overrides[name.strip()] = value
  return get_config(args.model, **overrides)


def _emulate(num_devices: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)
  except RuntimeError:
    raise UserError(f"JAX already started with {jax.device_count()} devices; "
                    f"--num_cpu_devices {num_devices} must come before it starts") from None


def _plan_args(args, **changes) -> dict:
  out = dict(batch_size=args.batch_size, input_length=args.input_length,
             target_length=args.target_length, optimizer=args.optimizer,
             num_microbatches=args.num_microbatches, device_memory_gib=args.device_memory_gib)
  out.update(changes)
  return out


def alternatives(config: ModelConfig, plan, args) -> list[str]:
  """Changes that bring a plan that does not fit closer, with their totals."""
  data, expert, model = plan.mesh_shape
  candidates = [("--num_microbatches ", m, config, plan.mesh_shape, {"num_microbatches": m})
                for m in (2, 4, 8, 16) if m > plan.num_microbatches]
  if config.dtype == "float32":
    candidates.append(("--set dtype=", "bfloat16", config.replace(dtype="bfloat16"),
                       plan.mesh_shape, {}))
  if args.optimizer == "adam":
    candidates.append(("--optimizer ", "adafactor", config, plan.mesh_shape,
                       {"optimizer": "adafactor"}))
  for new_mesh in ((data // 2, expert * 2, model), (data // 2, expert, model * 2),
                   (data, expert // 2, model * 2)):
    if math.prod(new_mesh) == plan.num_devices:
      candidates.append(("--mesh_shape ", ",".join(map(str, new_mesh)), config, new_mesh, {}))
  candidates.append(("--batch_size ", args.batch_size // 2, config, plan.mesh_shape,
                     {"batch_size": args.batch_size // 2}))
  found = []
  for flag, value, cfg, mesh, changes in candidates:
    try:
      other = analytic.plan(cfg, mesh, **_plan_args(args, **changes))
    except ConfigError:
      continue
    if other.total_bytes < plan.total_bytes:
      verdict = ", fits" if other.fits else ""
      found.append((other.total_bytes, f"{flag}{value} ({_size(other.total_bytes)}{verdict})"))
  return [text for _, text in sorted(found)][:4]


def _size(num_bytes: float) -> str:
  for unit, scale in (("GiB", analytic.GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.2f} {unit}"
  return f"{num_bytes:.0f} B"


def _table(name: str, config: ModelConfig, plan, compiled) -> str:
  g = lambda b: f"{_size(b):>14s}"
  data, expert, model = plan.mesh_shape
  lines = [
      f"{name}: {plan.num_params:.4g} parameters ({plan.num_expert_params:.4g} in experts), "
      f"activations {plan.dtype}",
      f"mesh: data {data} x expert {expert} x model {model} = {plan.num_devices} devices",
      f"step: {plan.batch_size} sequences x ({plan.input_length} + {plan.target_length}) tokens, "
      f"{plan.num_microbatches} microbatch(es), {plan.optimizer}",
      "",
      "per device                       analytic" + ("          compiled" if compiled else ""),
  ]
  rows = [("parameters (float32)", plan.param_bytes, "param_bytes"),
          (f"optimizer state ({plan.optimizer})", plan.optimizer_bytes, "optimizer_bytes"),
          ("gradients (float32)", plan.gradient_bytes, None),
          ("activations (estimate)", plan.activation_bytes, None),
          ("batch", plan.batch_bytes, "batch_bytes")]
  for label, value, key in rows:
    line = f"  {label:29s}{g(value)}"
    if compiled and key:
      line = f"  {label:29s}{g(value)}{g(getattr(compiled, key))}"
    lines.append(line)
  if compiled:
    temp = plan.gradient_bytes + plan.activation_bytes
    lines.append(f"  {'gradients + activations':29s}{g(temp)}{g(compiled.temp_bytes)}  (XLA temp)")
    lines.append(f"  {'total':29s}{g(plan.total_bytes)}{g(compiled.peak_bytes)}")
  else:
    lines.append(f"  {'total':29s}{g(plan.total_bytes)}")
  verdict = "fits" if plan.fits else "DOES NOT FIT"
  lines.append(f"  {'device memory':29s}{g(plan.device_memory_bytes)}  {verdict}")
  lines.append("")
  stacks = {}
  for r in plan.switch_routing:
    stacks.setdefault(r.name.split("/")[0], []).append(r)
  for stack, layers in stacks.items():
    r = layers[0]
    per_device = r.groups // (data * expert)
    plural = "s" if len(layers) > 1 else ""
    lines.append(f"{stack}: {len(layers)} Switch layer{plural} ({r.router}), per device "
                 f"{per_device} group(s) of {r.group_tokens} tokens, capacity {r.capacity}, "
                 f"expert work {r.slots_per_token:.2f}x a dense FFN per token, all-to-all "
                 f"{_size(plan.all_to_all_per_layer[r.name])} per layer per microbatch")
    if r.router != "dropless" and r.slots_per_token > 2 * config.train_capacity_factor:
      lines.append(f"  note: the minimum capacity ({config.min_expert_capacity}) binds: "
                   f"{r.group_tokens} tokens per group for {config.num_experts} experts; more "
                   f"tokens per device (batch or group size) would amortize it")
  a2a = plan.all_to_all_bytes
  line = f"all-to-all sent per device per step: {_size(a2a)} ({a2a:,} bytes)"
  if compiled:
    line += (f"; compiled: {compiled.all_to_all_bytes:,} bytes in HLO, "
             f"{compiled.program_all_to_all_bytes:,} in the program")
  lines.append(line)
  flops = plan.forward_flops_parts
  total = sum(flops.values())
  share = ", ".join(f"{k} {v / total:.0%}" for k, v in flops.items() if v) if total else ""
  lines.append(f"FLOPs: forward {plan.forward_flops_per_token:.4g} per token ({share}); "
               f"training (3x forward) {plan.train_flops_per_step:.4g} per step, "
               f"{plan.train_flops_per_step / plan.num_devices:.4g} per device")
  return "\n".join(lines)


def _flop(count: float) -> str:
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
    if count >= scale:
      return f"{count / scale:.4g} {unit}"
  return f"{count / 1e6:.4g} MFLOP"


def _tpu_table(step, plan) -> str:
  """The TPU compiler's figures for one chip, beside the analytic plan's."""
  m = step.memory
  data, expert, model = step.mesh_shape
  lines = [
      "",
      f"TPU {step.topology}: {math.prod(step.mesh_shape)} x {step.device_kind}, mesh data "
      f"{data} x expert {expert} x model {model}, expert kernel {step.dispatch!r}, compiled "
      f"for it on this machine in {step.compile_seconds:.0f} s",
      "per chip (TPU compiler)",
      f"  {'arguments (state, batch)':29s}{_size(m.argument_bytes):>14s}",
      f"  {'outputs not in place':29s}{_size(m.output_bytes - m.alias_bytes):>14s}",
      f"  {'temporaries (at the peak)':29s}{_size(step.temporaries_bytes):>14s}",
      f"  {'program (generated code)':29s}{_size(m.generated_code_bytes):>14s}",
  ]
  verdict = "fits" if step.fits else "DOES NOT FIT"
  ratio = plan.total_bytes / step.step_bytes
  lines.append(f"  {'total':29s}{_size(step.used_bytes):>14s}  of {_size(step.hbm_bytes)} "
               f"HBM: {verdict} (analytic {_size(plan.total_bytes)}: {ratio:.2f}x the "
               f"compiler's peak without the program)")
  lines.append(f"compute: {_flop(step.flops)} per chip per step (cost model, all ops), "
               f"{_flop(step.flops * plan.num_devices)} for the slice; model matmuls "
               f"{_flop(step.model_flops)} per chip (analytic)")
  dtypes = ", ".join(f"{n} {t}" for t, n in step.all_to_all_dtypes.items()) or "none"
  lines.append(f"all-to-all: {len(step.all_to_alls)} ops ({dtypes}), "
               f"{_size(step.all_to_all_bytes)} sent per chip per step (analytic "
               f"{_size(plan.all_to_all_bytes)})")
  gathers = step.expert_weight_gathers
  if gathers:
    shapes = sorted({f"{c.op} {t}{list(s)}" for c in gathers for t, s in c.arrays})
    lines.append(f"expert weights: {len(gathers)} all-gather/reduce-scatter(s) of expert "
                 f"weights in the HLO: {'; '.join(shapes[:4])}")
  else:
    lines.append("expert weights: no all-gather or reduce-scatter of expert weights "
                 f"({step.expert_weight_all_reduces} all-reduce(s) of expert gradients over "
                 "the data axis)")
  how = ("the TPU compiler's cost model (optimal_seconds)" if step.estimate_source
         == "optimal_seconds" else "a roofline: the compiler's FLOPs at the chip's peak or its "
         "bytes accessed at HBM bandwidth, whichever is slower, no communication; the cost "
         "model gave no time")
  lines.append(f"ESTIMATED step time {step.estimated_seconds * 1e3:.4g} ms, from {how}; not a "
               f"measurement. MFU at it {step.mfu:.1%} of {step.peak_flops / 1e12:g} bf16 "
               f"TFLOP/s per chip")
  return "\n".join(lines)


def _compile_for_topology(args, config):
  """(topology, its TPU-compiled step) for --topology."""
  from switch_jax.planning import tpu_compile  # pylint: disable=import-outside-toplevel
  topology = tpu.parse_topology(args.topology, args.num_slices)
  devices = tpu.topology_devices(topology)
  mesh = gin_flags.mesh_shape(args.mesh_shape) if args.mesh_shape else None
  step = tpu_compile.compile_for_topology(
      config, topology, mesh, batch_size=args.batch_size, input_length=args.input_length,
      target_length=args.target_length, optimizer=args.optimizer,
      num_microbatches=args.num_microbatches, devices=devices)
  return topology, step


def run(args) -> int:
  if args.num_cpu_devices:
    _emulate(args.num_cpu_devices)
  config = model_config(args)
  if args.num_slices and not args.topology:
    raise UserError("--num_slices needs --topology")
  tpu_step = None
  if args.topology:
    if args.compile:
      raise UserError("--topology compiles for the TPU slice; drop --compile (which "
                      "compiles for local devices)")
    topology, tpu_step = _compile_for_topology(args, config)
    if args.device_memory_gib is None:
      args.device_memory_gib = topology.chip.hbm_gib
    mesh = tpu_step.mesh_shape
    config = config.replace(dispatch=tpu_step.dispatch) if config.is_moe else config
  elif args.mesh_shape is None:
    raise UserError("give --mesh_shape DATA,EXPERT,MODEL (or --topology for a TPU slice)")
  else:
    mesh = gin_flags.mesh_shape(args.mesh_shape)
  if args.device_memory_gib is None:
    args.device_memory_gib = 16.0
  num_devices = args.num_devices
  if num_devices is None and -1 in mesh:
    if not (args.compile or args.num_cpu_devices):
      raise UserError(f"--mesh_shape {args.mesh_shape} has a -1: pass --num_devices to "
                      "resolve it")
    import jax  # pylint: disable=import-outside-toplevel
    num_devices = jax.device_count()
  plan = analytic.plan(config, mesh, num_devices=num_devices, **_plan_args(args))
  compiled = None
  note = None
  if args.compile:
    import jax  # pylint: disable=import-outside-toplevel
    if plan.num_devices > jax.device_count():
      note = (f"not compiled: the mesh needs {plan.num_devices} devices, {jax.device_count()} "
              f"are local (--num_cpu_devices {plan.num_devices} emulates them on CPU)")
    else:
      compiled = compiled_step.compiled_memory(
          config, plan.mesh_shape, batch_size=args.batch_size, input_length=args.input_length,
          target_length=args.target_length, optimizer=args.optimizer,
          num_microbatches=args.num_microbatches)
  warning = None
  over = plan.fits is False or (tpu_step is not None and not tpu_step.fits)
  if over:
    options = alternatives(config, plan, args)
    need = tpu_step.used_bytes if tpu_step is not None else plan.total_bytes
    source = "the TPU compiler" if tpu_step is not None else "the analytic plan"
    warning = (f"WARNING: {source} needs {_size(need)} per device, more than the "
               f"{args.device_memory_gib:g} GiB given; the analytic planner suggests "
               + ("; ".join(options) if options else "more devices (a larger mesh)"))
  if args.json:
    print(json.dumps({"model": args.model, "plan": plan.to_dict(),
                      "compiled": compiled.to_dict() if compiled else None,
                      "tpu": tpu_step.to_dict() if tpu_step else None,
                      "note": note, "warning": warning}, indent=2, default=str))
    return 0
  print(_table(args.model, config, plan, compiled))
  if tpu_step is not None:
    print(_tpu_table(tpu_step, plan))
  for line in (note, warning):
    if line:
      print(line)
  return 0
