"""The train step compiled by the TPU compiler (libtpu) for a TPU slice on
this CPU machine: one all-to-all each way per Switch layer and direction,
in bfloat16 under a bfloat16 policy; no all-gather of expert weights; the
analytic planner's memory within a stated band of the compiler's. Slice
names map to GCP's shapes. One compile for the module (~30-50 s on 2 cores)."""

import json
import re

import pytest

from switch_jax.cli import main as cli
from switch_jax.config import get_config
from switch_jax.errors import UserError
from switch_jax.planning import analytic, tpu

# A Switch model small enough to compile in seconds, with every width a
# multiple of 128 (the TPU's lane tile), so padding does not swamp the
# memory comparison; 8 experts over expert 4 x data 2 of a v5e-8.
CONFIG = get_config("tiny_switch", num_experts=8, dtype="bfloat16", d_model=128, d_ff=512,
                    num_heads=2, head_dim=128, vocab_size=1024)
MESH = (2, 4, 1)
KW = dict(batch_size=32, input_length=64, target_length=32)
SWITCH_LAYERS = ("encoder/layers_1", "decoder/layers_1")
# The stated band for analytic total / the TPU compiler's peak of live
# buffers (program excluded; the plan does not model it). The analytic
# activation copy counts are calibrated on XLA:CPU, which keeps copies the
# TPU compiler fuses away, so on TPU the plan is an upper bound, and a
# looser one as activations grow: measured 1.11 here, 1.19 (d_model 256,
# 128 + 64 tokens), 1.43 (64 sequences on 1 x 8), and 1.45 to 1.91 for
# the full-size Switch and T5 rows of docs/tpu.md (1.79: Switch-Base-8 on
# v5e-16 at 256 x (512 + 114)).
BAND = (1.0, 2.0)


@pytest.fixture(scope="module")
def step():
  pytest.importorskip("libtpu", reason="libtpu (pip install -e '.[tpu]') compiles for TPU")
  from switch_jax.planning import tpu_compile  # pylint: disable=import-outside-toplevel
  return tpu_compile.compile_for_topology(CONFIG, tpu.parse_topology("v5e-8"), MESH, **KW)


def test_the_step_is_compiled_for_tpu_chips_with_the_tpu_kernel(step):
  assert step.device_kind == "TPU v5 lite" and step.topology == "v5e-8"
  assert step.mesh_shape == MESH
  assert step.dispatch == "gather"  # 'auto' resolved for TPU, not for this CPU host


def test_one_bfloat16_all_to_all_each_way_per_switch_layer_and_direction(step):
  # Forward: dispatch and combine; backward: their transposes. The HLO's
  # metadata names the layer and whether the op is the backward pass.
  counts = {}
  for c in step.all_to_alls:
    layer = next(name for name in SWITCH_LAYERS if name in c.source)
    direction = "backward" if "transpose(" in c.source else "forward"
    counts[layer, direction] = counts.get((layer, direction), 0) + 1
  assert counts == {(layer, d): 2 for layer in SWITCH_LAYERS for d in ("forward", "backward")}
  assert step.all_to_all_dtypes == {"bf16": 8}
  assert all(c.group_size == MESH[1] for c in step.all_to_alls)


def test_all_to_all_bytes_equal_the_analytic_plan(step):
  plan = analytic.plan(CONFIG, MESH, **KW)
  assert step.all_to_all_bytes == plan.all_to_all_bytes > 0


def test_no_all_gather_or_reduce_scatter_of_expert_weights(step):
  # Expert weights stay on their devices; with data 2 their gradients are
  # summed over the data axis (all-reduces of [experts/4, d, f] shapes),
  # which also shows the shape test finds expert weights in this HLO.
  assert step.expert_weight_gathers == ()
  assert step.expert_weight_all_reduces > 0


def test_expert_weight_shapes_are_told_from_attention_weights():
  from switch_jax.planning import tpu_compile  # pylint: disable=import-outside-toplevel
  config = get_config("tiny_switch", num_experts=8)  # d 32, d_ff 64, 2 heads of 16
  assert tpu_compile.is_expert_weight_shape((2, 32, 64), config)
  assert tpu_compile.is_expert_weight_shape((8, 64, 1, 32), config)
  assert tpu_compile.is_expert_weight_shape((2, 32, 32), config, model_shards=2)
  assert tpu_compile.is_expert_weight_shape((1, 64, 32), config)  # one expert per device
  assert not tpu_compile.is_expert_weight_shape((2, 16, 32), config)  # attention out
  assert not tpu_compile.is_expert_weight_shape((32, 64), config)  # dense FFN
  assert not tpu_compile.is_expert_weight_shape((1, 32, 1, 64), config)
  assert not tpu_compile.is_expert_weight_shape((3, 32, 64), config)  # 3 does not divide 8


def test_analytic_memory_within_the_stated_band_of_the_tpu_compiler(step):
  plan = analytic.plan(CONFIG, MESH, **KW)
  m = step.memory
  # The state is exact: one device's shards of the abstract sharded state.
  assert (m.param_bytes, m.optimizer_bytes, m.batch_bytes) == (
      plan.param_bytes, plan.optimizer_bytes, plan.batch_bytes)
  ratio = plan.total_bytes / step.step_bytes
  assert BAND[0] <= ratio <= BAND[1], (plan.total_bytes, step.step_bytes)
  assert step.step_bytes > m.argument_bytes  # the peak has temporaries in it
  assert step.used_bytes == step.step_bytes + m.generated_code_bytes < step.hbm_bytes


def test_cost_model_flops_and_estimated_step_time(step):
  plan = analytic.plan(CONFIG, MESH, **KW)
  # The cost model counts every op; the plan, the matmuls only.
  assert 1.0 <= step.flops / step.model_flops <= 1.6, (step.flops, step.model_flops)
  assert step.model_flops == plan.train_flops_per_step / 8
  # This small step has the cost model's own estimate (full-size ones get
  # a negative optimal_seconds from libtpu 0.0.42, and the roofline).
  assert step.estimate_source == "optimal_seconds"
  assert step.estimated_seconds == step.optimal_seconds > 0
  assert step.roofline_seconds == max(step.flops / 197e12, step.bytes_accessed / 819e9) > 0
  assert 0 < step.mfu < 1
  assert step.peak_flops == 197e12 and step.hbm_bytes == 16 * 2 ** 30


def test_plan_cli_prints_the_tpu_figures(step, monkeypatch, capsys):
  from switch_jax.planning import tpu_compile  # pylint: disable=import-outside-toplevel
  seen = {}

  def compiled(config, topology, mesh, **kw):
    seen.update(topology=topology.topology_name, mesh=mesh, **kw)
    return step
  monkeypatch.setattr(tpu_compile, "compile_for_topology", compiled)
  monkeypatch.setattr(tpu, "topology_devices", lambda topology: [])
  args = ["plan", "--model", "tiny_switch", "--set", "num_experts=8", "--set", "dtype=bfloat16",
          "--set", "d_model=128", "--set", "d_ff=512", "--set", "head_dim=128",
          "--set", "vocab_size=1024", "--topology", "v5e-8", "--mesh_shape", "2,4,1",
          "--batch_size", "32", "--input_length", "64", "--target_length", "32"]
  assert cli.main(args) == 0
  text = capsys.readouterr().out
  assert seen["topology"] == "v5e:2x4" and seen["mesh"] == MESH and seen["batch_size"] == 32
  assert "TPU v5e-8: 8 x TPU v5 lite" in text
  assert "all-to-all: 8 ops (8 bf16)" in text
  assert "no all-gather or reduce-scatter of expert weights" in text
  assert re.search(r"ESTIMATED step time [\d.]+ ms, from the TPU compiler's cost model", text)
  assert "16.00 GiB HBM: fits" in text
  assert cli.main(args + ["--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["tpu"]["all_to_all_dtypes"] == {"bf16": 8}
  assert out["plan"]["device_memory_bytes"] == 16 * 2 ** 30  # the chip's HBM


@pytest.mark.parametrize("name, chips, libtpu_name, slices", [
    ("v5e-16", 16, "v5e:4x4", 1), ("v5litepod-8", 8, "v5e:2x4", 1),
    ("v4-8", 4, "v4:2x2x1", 1), ("v4-64", 32, "v4:2x4x4", 1), ("v4-2048", 1024, "v4:8x8x16", 1),
    ("v5p-128", 64, "v5:4x4x4", 1), ("v6e-256", 256, "v6e:16x16", 1),
    ("2xv5e-16", 16, "v5e:4x4", 2), ("v4:4x4x12", 192, "v4:4x4x12", 1)])
def test_slice_names_map_to_gcp_shapes(name, chips, libtpu_name, slices):
  topology = tpu.parse_topology(name)
  assert (topology.chips_per_slice, topology.topology_name, topology.num_slices) == (
      chips, libtpu_name, slices)
  assert topology.num_devices == chips * slices


def test_bad_slice_names_say_what_is_accepted():
  for bad, words in (("v5e-12", "power of two"), ("v4-7", "two per chip"),
                     ("tpu-16", "accelerator type"), ("v9-8", "unknown TPU chip"),
                     ("v5e:4x4x4", "2 dimensions")):
    with pytest.raises(UserError, match=words):
      tpu.parse_topology(bad)
  assert tpu.parse_topology("v5e-16", num_slices=4).name == "4xv5e-16"


def test_v4_and_v5p_chips_are_one_megacore_device_each():
  pytest.importorskip("libtpu", reason="libtpu (pip install -e '.[tpu]') compiles for TPU")
  devices = tpu.topology_devices(tpu.parse_topology("v4-8"))
  assert [d.device_kind for d in devices] == ["TPU v4"] * 4
  two = tpu.topology_devices(tpu.parse_topology("2xv5p-8"))
  assert len(two) == 8 and {d.slice_index for d in two} == {0, 1}


def test_without_libtpu_the_flag_says_how_to_get_it(monkeypatch, capsys):
  monkeypatch.setitem(__import__("sys").modules, "libtpu", None)  # import fails
  with pytest.raises(UserError, match=r'pip install -e "\.\[tpu\]"'):
    tpu.topology_devices(tpu.parse_topology("v5e-8"))
  assert cli.main(["plan", "--model", "tiny_switch", "--topology", "v5e-8",
                   "--batch_size", "8"]) != 0
  assert "jax[tpu]==" in capsys.readouterr().err


def test_collectives_are_read_in_every_replica_group_spelling():
  from switch_jax.planning import tpu_compile  # pylint: disable=import-outside-toplevel
  hlo = "\n".join([
      "  %a = bf16[4,2,320]{2,1,0:T(2,128)(2,1)S(1)} all-to-all(%r), channel_id=1, "
      "replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, metadata={op_name=\"x/mlp\"}",
      "  %b = f32[2,32,64]{2,1,0} all-reduce(%g), replica_groups=[2,4]<=[8], to_apply=%sum",
      "  %c = f32[] all-reduce(%h), channel_id=11, replica_groups=mesh['axis_0'=8,'axis_1'=1], "
      "device_ids=([2,4]T(1,0)) {'axis_0','axis_1'}, use_global_device_ids=true",
      "  %f = f32[] all-reduce(%i), channel_id=3, replica_groups=mesh['axis_0'=8,'axis_1'=1] "
      "{'axis_0'}, use_global_device_ids=true, to_apply=%sum",  # XLA:CPU's mesh spelling
      "  %d = (bf16[1,32,64], bf16[4,32,64]) all-gather-start(%w), replica_groups={{0,1,2,3}}",
      "  %e = bf16[4,32,64] all-gather-done(%d)"])
  found = tpu_compile.hlo_collectives(hlo)
  assert [(c.op, c.group_size) for c in found] == [
      ("all-to-all", 4), ("all-reduce", 4), ("all-reduce", 8), ("all-reduce", 8),
      ("all-gather", 4)]
  assert found[0].bytes == 4 * 2 * 320 * 2 and found[0].source == "x/mlp"
  assert found[4].arrays == (("bf16", (4, 32, 64)),)  # the result, not the operand
