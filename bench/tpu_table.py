"""The train step compiled for TPU slices on this (CPU) machine: the table
of docs/tpu.md, one JSON per row, resumable.

  python bench/tpu_table.py                    # every row not yet recorded
  python bench/tpu_table.py --rows switch_base_8@v5e-16,t5_base@v5e-16
  python bench/tpu_table.py --kernels          # the expert-kernel comparison
  python bench/tpu_table.py --markdown         # print the tables from the JSON

A full-size compile takes minutes (Switch-Base-8 for v5e-16: ~10 on 2
busy cores), so each finished row is written to
bench/recorded/tpu_table/<row>.json at once and skipped on the next run.
Every step time here is the TPU compiler's cost-model ESTIMATE
(`optimal_seconds`), and MFU is taken at that estimate; nothing ran on a TPU.
Needs libtpu: pip install -e ".[tpu]".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from switch_jax.config import get_config  # noqa: E402
from switch_jax.planning import analytic, tpu, tpu_compile  # noqa: E402

OUT = ROOT / "bench" / "recorded" / "tpu_table"
GIB = 2 ** 30
BASE_BATCH = dict(batch_size=256, input_length=512, target_length=114)  # the paper's
# (model, topology, mesh, batch): a Switch model on a real slice shape and
# the dense model of equal FLOPs per token (Switch-Base ~ T5-Base,
# Switch-Large ~ T5-Large) on the same slice, all in bfloat16 with Adafactor.
ROWS = {
    "switch_base_8@v5e-16": ("switch_base_8", "v5e-16", (2, 8, 1), BASE_BATCH),
    "t5_base@v5e-16": ("t5_base", "v5e-16", (16, 1, 1), BASE_BATCH),
    "switch_base_128@v4-64": ("switch_base_128", "v4-64", (1, 32, 1), BASE_BATCH),
    "t5_base@v4-64": ("t5_base", "v4-64", (32, 1, 1), BASE_BATCH),
    "switch_large_128@v5p-128": ("switch_large_128", "v5p-128", (1, 64, 1), BASE_BATCH),
    "t5_large@v5p-128": ("t5_large", "v5p-128", (64, 1, 1), BASE_BATCH),
    # Switch-C on 1024 chips: two experts and two sequences per chip, a
    # plausible pod step (our choice, not the paper's recipe).
    "switch_c_2048@v4-2048": ("switch_c_2048", "v4-2048", (1, 1024, 1),
                              dict(batch_size=2048, input_length=512, target_length=114)),
}
# The expert kernels that run with experts split over devices, on one
# mid-size step: Switch-Base-32's widths (4 experts per chip: a loop over
# local experts differs from one batched matmul only with several) with
# 2 + 2 layers (one Switch layer per stack) and 64 x (128, 32) tokens, on
# v5e-8 (a few minutes a compile here). `--kernel_model switch_base_8`
# was the first run: 1 expert per chip, where the kernels tie.
KERNEL_CASE = dict(topology="v5e-8", mesh=(1, 8, 1),
                   overrides=dict(num_encoder_layers=2, num_decoder_layers=2),
                   batch=dict(batch_size=64, input_length=128, target_length=32))
KERNELS = {"top1": ("gather", "looped"), "dropless": ("ragged", "bucketed")}


def run_row(name: str, model: str, topology: str, mesh, batch: dict, **overrides) -> dict:
  config = get_config(model, dtype="bfloat16", **overrides)
  topo = tpu.parse_topology(topology)
  step = tpu_compile.compile_for_topology(config, topo, mesh, **batch)
  plan = analytic.plan(step_config(config, step), step.mesh_shape,
                       device_memory_gib=topo.chip.hbm_gib, **batch)
  return dict(row=name, model=model, topology=topology, topology_name=topo.topology_name,
              batch=batch, overrides=overrides, tpu=step.to_dict(),
              analytic=dict(total_bytes=plan.total_bytes, activation_bytes=plan.activation_bytes,
                            all_to_all_bytes=plan.all_to_all_bytes,
                            forward_flops_per_token=plan.forward_flops_per_token,
                            train_flops_per_step=plan.train_flops_per_step),
              host=dict(machine=platform.machine(), when=time.strftime("%Y-%m-%d %H:%M")))


def step_config(config, step):
  return config.replace(dispatch=step.dispatch) if config.is_moe else config


def write(name: str, result: dict) -> None:
  OUT.mkdir(parents=True, exist_ok=True)
  (OUT / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))


def _bytes(t: dict) -> tuple[int, int]:
  """(step peak, with the program) from the recorded memory figures, as
  TpuStep.step_bytes and used_bytes compute them."""
  m = t["memory"]
  step = max(m["peak_bytes"], m.get("compiler_peak_bytes", 0))
  return step, step + m.get("generated_code_bytes", 0)


def _roofline(r: dict) -> float:
  t = r["tpu"]
  chip = tpu.parse_topology(r["topology"]).chip
  return max(t["flops"] / (chip.peak_bf16_tflops * 1e12),
             t["bytes_accessed"] / (chip.hbm_gb_per_s * 1e9))


def _seconds(r: dict) -> tuple[float, str, float]:
  """(estimated step seconds, its source, MFU at it) from a recorded row:
  the compiler's optimal_seconds where positive, else the roofline
  (TpuStep.roofline_seconds, recomputed for rows recorded before it was)."""
  t = r["tpu"]
  optimal = t.get("optimal_seconds", t.get("estimated_seconds"))
  if optimal and optimal > 0:
    seconds, source = optimal, "cost model"
  else:
    seconds, source = _roofline(r), "roofline"
  return seconds, source, t["model_flops"] / (seconds * t["peak_flops"])


def markdown() -> str:
  rows = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
  lines = ["| model @ slice | mesh (d, e, m) | HBM per chip: used / chip | fits | all-to-all "
           "sent per chip | estimated step | MFU at estimate | analytic / compiled memory | "
           "compile |", "|---|---|---|---|---|---|---|---|---|"]
  for name in ROWS:
    r = rows.get(name)
    if r is None:
      lines.append(f"| {name} | not run | | | | | | | |")
      continue
    t = r["tpu"]
    step_bytes, used = _bytes(t)
    est, source, mfu = _seconds(r)
    step = f"{est * 1e3:.0f} ms ({source})"
    mfu = f"{mfu:.0%}"
    lines.append(
        f"| {name} | {tuple(t['mesh_shape'])} | {used / GIB:.2f} / "
        f"{t['hbm_bytes'] / GIB:.0f} GiB | {'yes' if used <= t['hbm_bytes'] else 'NO'} | "
        f"{t['all_to_all_bytes'] / GIB:.3f} GiB ({len(t['all_to_alls'])} ops, "
        f"{','.join(t['all_to_all_dtypes']) or '-'}) | {step} | {mfu} | "
        f"{r['analytic']['total_bytes'] / step_bytes:.2f} | "
        f"{t['compile_seconds']:.0f} s |")
  for switch, dense in (("switch_base_8@v5e-16", "t5_base@v5e-16"),
                        ("switch_base_128@v4-64", "t5_base@v4-64"),
                        ("switch_large_128@v5p-128", "t5_large@v5p-128")):
    if switch in rows and dense in rows:
      s, d = rows[switch], rows[dense]
      # Rooflines on both sides: a cost-model time on one side only
      # would compare two different estimates.
      ratio = _roofline(s) / _roofline(d)
      lines.append(f"\n{switch} / {dense}: roofline step time ratio {ratio:.2f}; forward "
                   f"FLOPs per token {s['analytic']['forward_flops_per_token']:.3g} vs "
                   f"{d['analytic']['forward_flops_per_token']:.3g}")
  kernels = sorted(OUT.glob("kernel_*.json"))
  if kernels:
    lines += ["", "| model | router | kernel | estimated step | TFLOP per chip: compiler / "
              "model | GB accessed per chip | HBM used | compile |",
              "|---|---|---|---|---|---|---|---|"]
    for p in kernels:
      r = json.loads(p.read_text())
      t = r["tpu"]
      est, source, _ = _seconds(r)
      lines.append(f"| {r['model']} | {r['router']} | {r['kernel']} | {est * 1e3:.2f} ms "
                   f"({source}) | {t['flops'] / 1e12:.3g} / {t['model_flops'] / 1e12:.3g} | "
                   f"{t['bytes_accessed'] / 1e9:.2f} | "
                   f"{_bytes(t)[1] / GIB:.2f} GiB | {t['compile_seconds']:.0f} s |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", help="comma-separated row names (default: all)")
  parser.add_argument("--kernels", action="store_true", help="the expert-kernel comparison")
  parser.add_argument("--kernel_model", default="switch_base_32",
                      help="the model of the kernel comparison")
  parser.add_argument("--markdown", action="store_true", help="print the tables and stop")
  parser.add_argument("--force", action="store_true", help="recompile rows already recorded")
  args = parser.parse_args(argv)
  if args.markdown:
    print(markdown())
    return 0
  if args.kernels:
    c = KERNEL_CASE
    for router, kernels in KERNELS.items():
      for kernel in kernels:
        name = f"kernel_{args.kernel_model}_{router}_{kernel}"
        if (OUT / f"{name}.json").exists() and not args.force:
          continue
        print(f"compiling {name} ...", flush=True)
        result = run_row(name, args.kernel_model, c["topology"], c["mesh"], c["batch"],
                         router=router, dispatch=kernel, **c["overrides"])
        write(name, dict(result, router=router, kernel=kernel))
    return 0
  names = args.rows.split(",") if args.rows else list(ROWS)
  for name in names:
    if (OUT / f"{name}.json").exists() and not args.force:
      print(f"{name}: recorded, skipped", flush=True)
      continue
    model, topology, mesh, batch = ROWS[name]
    print(f"compiling {name} ...", flush=True)
    result = run_row(name, model, topology, mesh, batch)
    write(name, result)
    t = result["tpu"]
    print(f"{name}: {_bytes(t)[1] / GIB:.2f} GiB, {_seconds(result)[0]:.4g} s (estimate), "
          f"compiled in {t['compile_seconds']:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
