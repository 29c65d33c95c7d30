"""The switch-jax benchmark suite: one command, a printed table and a JSON file.

  python bench/run.py [--quick] [--out bench/results/latest.json]

Every figure is a ratio or a rate measured in this run (see bench_timer.py
for how cases are timed on a shared machine). Sections: the matmul peak;
the Switch layer vs the FLOP-matched dense MLP for every router and
expert kernel; Hugging Face's PyTorch layer at the same shapes; whole
train steps and their model-FLOPs utilization; compiled memory as experts
and tokens grow; compile times. docs/performance.md explains the method
and records the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import bench_layer  # noqa: E402
import bench_model  # noqa: E402
import bench_timer  # noqa: E402
import bench_torch  # noqa: E402
import bench_report  # noqa: E402
from switch_jax.model.moe import routing  # noqa: E402
from switch_jax.config import get_config  # noqa: E402
from switch_jax.cli.launch import huge_page_env  # noqa: E402

SECTIONS = ("layer", "hf", "model", "memory", "compile")


def plan(quick: bool) -> dict:
  """What to measure: --quick is a few minutes, the full suite about an hour."""
  if quick:
    return dict(rounds=3, budget_s=20.0, experts=[8, 32], tokens=[4096], dtypes=["float32"],
                factors=[1.0, 1.25], top2_factors=[2.0, 2.5],
                kernels=[("top1", "compact"), ("top1", "looped"), ("dropless", "bucketed")],
                realistic=[], max_ragged_experts=8, hf_experts=[8],
                memory_experts=[8, 128], memory_tokens=[4096, 16384], model_dtypes=["float32"],
                model_batch=2, compile_models=["tiny_switch"])
  return dict(rounds=5, budget_s=60.0, experts=[8, 32, 128, 512], tokens=[4096],
              dtypes=["float32", "bfloat16"], factors=[1.0, 1.25],
              # Top-2 at the paper's cf 2.0 (2.5: top-1's 1.25 slack per choice).
              top2_factors=[2.0, 2.5], kernels=bench_layer.KERNELS,
              realistic=[(32, 16384), (128, 16384)], max_ragged_experts=32,
              hf_experts=[8, 32, 128, 512], memory_experts=[8, 32, 128, 512],
              memory_tokens=[4096, 16384, 65536], model_dtypes=["float32", "bfloat16"],
              model_batch=4, compile_models=["tiny_switch", "switch_base", "t5_base"])


def layer_cases(p: dict) -> list[bench_layer.Case]:
  cases = []
  for dtype in p["dtypes"]:
    for tokens in p["tokens"]:
      for num_experts in p["experts"]:
        cases.append(bench_layer.Case("experts_only", "batched", num_experts, tokens, None, dtype))
        for router, kernel in p["kernels"]:
          if kernel == "ragged" and num_experts > p["max_ragged_experts"]:
            continue  # XLA:CPU's ragged_dot does E dense matmuls: minutes a step
          factors = {"dropless": [None], "top2": p["top2_factors"]}.get(router, p["factors"])
          cases += [bench_layer.Case(router, kernel, num_experts, tokens, cf, dtype)
                    for cf in factors]
  for num_experts, tokens in p["realistic"]:  # thousands of tokens per expert per step
    for cf in p["factors"]:
      cases += [bench_layer.Case("top1", kernel, num_experts, tokens, cf, "float32")
                for kernel in ("compact", "looped")]
    cases.append(bench_layer.Case("dropless", "bucketed", num_experts, tokens, None, "float32"))
    cases.append(bench_layer.Case("experts_only", "batched", num_experts, tokens, None, "float32"))
  return cases


def save(results: dict, path: str) -> None:
  """Writes what is measured so far (after every section: a crash or ^C
  late in a long run keeps the rest)."""
  results["meta"]["load_end"] = bench_timer.load_average()
  results["goals"] = bench_report.goals(results)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
  os.replace(path + ".tmp", path)


def log(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')} load {bench_timer.load_average():.1f}] {message}",
        file=sys.stderr, flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a few minutes: fewer cases")
  parser.add_argument("--no_hugepages", action="store_true",
                      help="keep malloc on 4 KiB pages (by default the suite re-runs itself "
                      "with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as launch/local.sh runs "
                      "training)")
  parser.add_argument("--out", default="bench/results/latest.json", help="JSON output path")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help=f"comma-separated subset of {','.join(SECTIONS)}")
  parser.add_argument("--experts", help="comma-separated expert counts for the layer "
                      "section, instead of the plan's")
  parser.add_argument("--dtypes", help="comma-separated layer dtypes, instead of the plan's")
  args = parser.parse_args(argv)
  env = huge_page_env(os.environ)
  if argv is None and not args.no_hugepages and env["GLIBC_TUNABLES"] != os.environ.get(
      "GLIBC_TUNABLES"):
    os.execve(sys.executable, [sys.executable, *sys.argv], env)  # glibc reads it at start
  sections = args.sections.split(",")
  p = plan(args.quick)
  if args.experts:
    p["experts"] = [int(e) for e in args.experts.split(",")]
    p["realistic"] = [(e, t) for e, t in p["realistic"] if e in p["experts"]]
  if args.dtypes:
    p["dtypes"] = args.dtypes.split(",")
  results = {"meta": {"command": " ".join(["python", "bench/run.py"] + (argv or sys.argv[1:])),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick,
                      "jax": jax.__version__, "backend": jax.default_backend(),
                      "cpu": platform.processor() or platform.machine(),
                      "cpu_count": os.cpu_count(), "load_start": bench_timer.load_average(),
                      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}}
  log("matmul peak")
  results["peak_gflops"] = bench_timer.matmul_peak(p["rounds"])
  dense = {}

  def dense_for(tokens, dtype):
    if (tokens, dtype) not in dense:
      fn, args_ = bench_layer.dense_step(tokens, dtype)
      dense[(tokens, dtype)] = bench_timer.Compiled.of(fn, *args_)
    return dense[(tokens, dtype)]

  if "layer" in sections:
    results["layer"] = []
    for case in layer_cases(p):
      log(case.name)
      row = bench_layer.run_case(case, dense_for(case.tokens, case.dtype), p["rounds"],
                                 p["budget_s"])
      results["layer"].append(row)
      log(f"  {row['ratio']:.2f}x dense, {row['tokens_per_s']:.0f} tok/s")
  save(results, args.out)
  if "hf" in sections:
    why_not = bench_torch.available()
    results["hf"] = [] if why_not is None else {"skipped": why_not}
    for num_experts in p["hf_experts"] if why_not is None else []:
      tokens = 4096
      capacity = routing.expert_capacity(tokens, num_experts, 1.25)
      log(f"hugging face E={num_experts}")
      results["hf"].append(bench_torch.compare(
          num_experts, tokens, capacity, bench_layer.D_MODEL, bench_layer.D_FF,
          dense_for(tokens, "float32"), p["rounds"], p["budget_s"] * 3))
  save(results, args.out)
  if "model" in sections:
    results["model"] = []
    for dtype in p["model_dtypes"]:
      log(f"train step {dtype}")
      results["model"].append(bench_model.train_steps(
          8, dtype, p["model_batch"], (512, 114), p["rounds"], p["budget_s"] * 3))
  save(results, args.out)
  if "memory" in sections:
    log("compiled memory")
    kernels = [("top1", "compact"), ("top1", "looped"), ("dropless", "bucketed")]
    results["memory"] = bench_layer.memory_scaling(p["memory_experts"], p["memory_tokens"],
                                                   kernels if not args.quick else kernels[:1])
  save(results, args.out)
  if "compile" in sections:
    results["compile"] = []
    for name in p["compile_models"]:
      lengths = (32, 32) if name.startswith("tiny") else (512, 114)
      log(f"compile {name}")
      row = bench_model.compile_seconds(get_config(name), 8, lengths)
      results["compile"].append(dict(model=name, batch=8, lengths=list(lengths), **row))
  save(results, args.out)
  results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  save(results, args.out)
  print(bench_report.markdown(results))
  log(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
