"""The benchmark's baselines do the work they claim (bench/ is a command,
not a test; this only checks what its ratios are measured against)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_layer  # noqa: E402  pylint: disable=wrong-import-position
import bench_timer  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize("step", ["dense", "experts_only"])
def test_baselines_run_all_six_matmuls_of_an_mlp_fwd_bwd(monkeypatch, step):
  # With a loss whose gradient ignores the output (sum(y)), XLA dropped the
  # second forward matmul: 5/6 of these FLOPs.
  monkeypatch.setattr(bench_layer, "D_MODEL", 64)
  monkeypatch.setattr(bench_layer, "D_FF", 128)
  tokens = 512
  fn, args = (bench_layer.dense_step(tokens, "float32") if step == "dense"
              else bench_layer.experts_only_step(4, tokens, "float32"))
  matmuls = 6 * 2 * tokens * 64 * 128
  assert matmuls <= bench_timer.Compiled.of(fn, *args).flops < 1.1 * matmuls
