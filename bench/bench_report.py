"""The results of bench/run.py as markdown tables and goal checks."""

from __future__ import annotations

from typing import Optional

from switch_jax.model.moe.switch_layer import auto_dispatch

# flaxformer's MoeLayer (d 512, d_ff 2048, 4096 tokens, float32, cf 1.25,
# fwd+bwd, one device) in dense-MLP step times, as quoted in the issue that
# asked for this suite: NOT re-measured here (flaxformer does not install).
FLAXFORMER_QUOTED = {"scatter": {8: 1.6, 32: 3.8, 128: 45.0},
                     "masked": {8: 2.0, 32: 2.8, 128: 29.0}}


def _find(rows, **match) -> Optional[dict]:
  for row in rows or []:
    if all(row.get(k) == v for k, v in match.items()):
      return row
  return None


def _check(value: Optional[float], limit: float, above: bool = False) -> dict:
  if value is None:
    return {"value": None, "limit": limit, "met": None}
  return {"value": round(value, 3), "limit": limit,
          "met": value >= limit if above else value <= limit}


def goals(results: dict) -> dict:
  """The issue's goals, checked against this run's numbers."""
  # Goals are about the default path of this backend (what users run).
  default = auto_dispatch("top1", results["meta"]["backend"])
  layer = [r for r in results.get("layer") or []
           if r["router"] != "top1" or r["path"] == default]
  out = {}
  for e, tokens, cf, limit in ((8, 4096, 1.0, 1.15), (32, 4096, 1.0, 1.15),
                               (8, 4096, 1.25, 1.3), (32, 4096, 1.25, 1.3),
                               (128, 16384, 1.0, 1.3)):
    row = _find(layer, router="top1", num_experts=e, tokens=tokens, capacity_factor=cf,
                dtype="float32")
    out[f"top1 E={e} T={tokens} cf={cf} vs dense"] = _check(row and row["ratio"], limit)
  for row in layer:
    if row["router"] == "dropless" and row["path"] == "bucketed":
      capacity = _find(layer, router="top1", num_experts=row["num_experts"],
                       tokens=row["tokens"], capacity_factor=1.0, dtype=row["dtype"])
      if capacity:
        name = f"dropless E={row['num_experts']} T={row['tokens']} {row['dtype']} vs top1 cf=1.0"
        out[name] = _check(row["ratio"] / capacity["ratio"], 1.1)
  for row in results.get("model") or []:
    if row["dtype"] == "float32":
      for name in ("dense", "switch"):
        out[f"train step MFU, {name} Base-shaped small, float32"] = _check(row[name]["mfu"], 0.5,
                                                                          above=True)
  hf = results.get("hf")
  for row in hf if isinstance(hf, list) else []:
    ours = _find(layer, router="top1", num_experts=row["num_experts"], tokens=row["tokens"],
                 capacity_factor=1.25, dtype="float32")
    if ours:
      out[f"vs Hugging Face E={row['num_experts']} (x faster)"] = _check(
          row["hf_ratio"] / ours["ratio"], 5.0, above=True)
  for e in (8, 32, 128):
    ours = _find(layer, router="top1", num_experts=e, tokens=4096, capacity_factor=1.25,
                 dtype="float32")
    best = min(FLAXFORMER_QUOTED["scatter"][e], FLAXFORMER_QUOTED["masked"][e])
    if ours:
      out[f"vs flaxformer E={e} (quoted {best}x dense)"] = _check(ours["ratio"], best)
  return out


def _fmt(value, spec=".2f") -> str:
  return "-" if value is None else format(value, spec)


def _mib(n) -> str:
  return "-" if n is None else f"{n / 2 ** 20:,.0f}"


def markdown(results: dict) -> str:
  meta, lines = results["meta"], []
  peak = results.get("peak_gflops", {})
  lines.append(f"switch-jax benchmark, {meta['started']}, JAX {meta['jax']} "
               f"({meta['backend']}, {meta['cpu_count']} cores), load average "
               f"{meta['load_start']:.1f} -> {meta.get('load_end', 0):.1f}")
  lines.append(f"matmul peak: float32 {peak.get('float32', 0):.0f} GFLOP/s, "
               f"bfloat16 {peak.get('bfloat16', 0):.0f} GFLOP/s\n")
  if results.get("layer"):
    lines.append("| router | path | E | tokens | cf | dtype | C | vs dense | tok/s | dense tok/s "
                 "| dense GFLOP/s | compile s | temp MiB | XLA MiB moved (dense) |")
    lines.append("|" + "---|" * 14)
    for r in results["layer"]:
      lines.append(
          f"| {r['router']} | {r['path']} | {r['num_experts']} | {r['tokens']} "
          f"| {_fmt(r['capacity_factor'], 'g')} | {r['dtype']} | {_fmt(r['capacity'], 'd')} "
          f"| {r['ratio']:.2f}x | {r['tokens_per_s']:,.0f} | {r['dense_tokens_per_s']:,.0f} "
          f"| {r['dense_gflops']:.0f} | {r['compile_s']:.1f} | {_mib(r['temp_bytes'])} "
          f"| {_mib(r['xla_bytes_accessed'])} ({_mib(r['dense_xla_bytes_accessed'])}) |")
    lines.append("")
  hf = results.get("hf")
  if isinstance(hf, dict):
    lines.append(f"Hugging Face: skipped ({hf['skipped']})\n")
  elif hf:
    lines.append("| HF SparseMLP E | C | HF vs dense | HF tok/s |")
    lines.append("|---|---|---|---|")
    for r in hf:
      lines.append(f"| {r['num_experts']} | {r['capacity']} | {r['hf_ratio']:.1f}x "
                   f"| {r['hf_tokens_per_s']:,.0f} |")
    lines.append("")
  for r in results.get("model") or []:
    lines.append(f"train step, Base-shaped 2+2 layers, E={r['num_experts']}, {r['dtype']}, "
                 f"batch {r['batch']} x {r['lengths']}: switch/dense step {r['step_ratio']:.2f}x")
    for name in ("dense", "switch"):
      m = r[name]
      lines.append(f"  {name}: {m['tokens_per_s']:,.0f} tok/s, MFU {m['mfu']:.0%} "
                   f"(hardware {m['hardware_fu']:.0%}) of {r['peak_gflops']:.0f} GFLOP/s, "
                   f"{m['parameters'] / 1e6:.0f}M params, compile {m['compile_s']:.0f} s")
  if results.get("memory"):
    lines.append("\n| path | E | tokens | temp MiB | expert weights MiB | outputs MiB |")
    lines.append("|---|---|---|---|---|---|")
    for r in results["memory"]:
      lines.append(f"| {r['router']}/{r['path']} | {r['num_experts']} | {r['tokens']} "
                   f"| {_mib(r['temp_bytes'])} | {_mib(r['expert_weight_bytes'])} "
                   f"| {_mib(r['output_bytes'])} |")
  for r in results.get("compile") or []:
    lines.append(f"compile {r['model']} train step (batch {r['batch']}, {r['lengths']}): "
                 f"trace+lower {r['lower_s']:.1f} s, XLA {r['compile_s']:.1f} s")
  lines.append("\n| goal | value | limit | met |")
  lines.append("|---|---|---|---|")
  for name, g in results.get("goals", {}).items():
    lines.append(f"| {name} | {_fmt(g['value'], '.3f')} | {g['limit']} | {g['met']} |")
  return "\n".join(lines)
