"""experiments/: the numbers the written results report, the sentence pairs
of the fine-tuning task, and every arm's configuration (no training here:
the runs take an hour; `python experiments/run.py all` makes them)."""

import math
import sys
from pathlib import Path

import pytest

from switch_jax.data import continuation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import analysis  # noqa: E402  pylint: disable=wrong-import-position
import run  # noqa: E402  pylint: disable=wrong-import-position


def test_training_seconds_add_each_window():
  records = [{"step": 10, "seconds_per_step": 0.5}, {"step": 30, "seconds_per_step": 0.25},
             {"step": 40, "seconds_per_step": 1.0}]
  seconds = analysis.training_seconds(records)
  assert seconds == {10: 5.0, 30: 10.0, 40: 20.0}
  assert analysis.time_at(seconds, 20) == pytest.approx(7.5)
  assert analysis.time_at(seconds, 5) == pytest.approx(2.5)


def test_speedup_interpolates_between_evaluations():
  dense_steps, dense = [100, 200, 300], [7.0, 6.5, 6.2]
  # Reaches 6.2 a fifth of the way from step 100 (6.25) to step 200 (6.0).
  steps, switch = [100, 200, 300], [6.25, 6.0, 5.9]
  assert analysis.first_reaching(steps, switch, 6.2) == pytest.approx(120.0)
  assert analysis.speedup_to_reach(dense_steps, dense, steps, switch) == pytest.approx(2.5)
  assert analysis.first_reaching(steps, [6.1, 6.0, 5.9], 6.2) == 100.0
  assert analysis.speedup_to_reach(dense_steps, dense, steps, [7.1, 6.8, 6.3]) is None


def test_share_of_gain_kept_and_seed_spread():
  # Teacher 0.2 nats better than dense; the student recovers 0.06 of it.
  assert analysis.share_of_gain_kept(dense=6.0, teacher=5.8, student=5.94) == pytest.approx(0.3)
  with pytest.raises(ValueError):
    analysis.share_of_gain_kept(6.0, 6.0, 5.9)
  mean, std = analysis.mean_std([1.0, 2.0, 3.0])
  assert (mean, std) == (2.0, 1.0)
  assert analysis.mean_std([4.0]) == (4.0, 0.0)
  assert analysis.median([3.0, 1.0, 2.0, 10.0]) == 2.5
  assert analysis.curve([{"step": 1, "x": 2.0}, {"step": 2, "x": math.nan}, {"step": 3}],
                        "x") == ([1], [2.0])


def test_eval_records_read_in_the_shared_and_the_old_names():
  old = {"step": 4, "router/fraction_dropped": 0.25, "router/aux_loss": 1.1,
         "rte/accuracy": 60.0}
  new = {"step": 4, "fraction_dropped": 0.5, "router_aux_loss_unscaled": 1.1,
         "rte/accuracy": 61.0, "mix/average": 70.0, "rte/teacher_forced/loss": 2.0}
  assert (analysis.eval_fraction_dropped(old), analysis.eval_fraction_dropped(new)) == (0.25, 0.5)
  assert analysis.eval_fraction_dropped({"step": 4}) is None
  assert analysis.task_metric_names(old) == ["rte/accuracy"]
  assert analysis.task_metric_names(new) == ["rte/accuracy", "mix/average"]


def test_continuation_pairs():
  docs = ["Open the file first. Then read every line of it. Close it.",
          "One sentence only, nothing follows here.",
          "Too short. Second sentence is long enough here.",
          "Sockets need an address. Bind the socket before you listen.",
          "Parse the arguments given. Return a namespace with each value."]
  assert continuation.first_two_sentences(docs[0]) == (
      "Open the file first.", "Then read every line of it.")
  assert continuation.first_two_sentences(docs[1]) is None
  assert continuation.first_two_sentences(docs[2]) is None  # "Too short." has 2 words
  pairs = continuation.make_examples(docs)
  assert pairs["idx"] == [0, 1, 2]
  firsts = ["Open the file first.", "Sockets need an address.", "Parse the arguments given."]
  seconds = ["Then read every line of it.", "Bind the socket before you listen.",
             "Return a namespace with each value."]
  assert pairs["sentence1"] == firsts
  for i, label in enumerate(pairs["label"]):
    if label == 1:
      assert pairs["sentence2"][i] == seconds[i]
    else:  # the same words in another order
      words, original = pairs["sentence2"][i].split(), seconds[i].split()
      assert pairs["sentence2"][i] != seconds[i] and sorted(words) == sorted(original)
  assert continuation.shuffled("a b c d e", "key") == continuation.shuffled("a b c d e", "key")
  assert continuation.shuffled("a a a a", "key") == "a a a a"  # no other order exists
  many = continuation.make_examples(f"Line {i} starts a doc. And line {i} ends it well."
                                    for i in range(400))
  assert 0.4 < sum(many["label"]) / 400 < 0.6
  for i, (second, label) in enumerate(zip(many["sentence2"], many["label"])):
    original = f"And line {i} ends it well."
    assert (second == original) == (label == 1)
    assert sorted(second.split()) == sorted(original.split())
  files = [f"train-{i}" for i in range(8)]
  assert continuation.split_files("train", files, ["val"]) == files[1:]
  assert continuation.split_files("validation", files, ["val"]) == ["val", "train-0"]


def test_every_arm_parses_and_shared_arms_are_the_same_run(tmp_path, monkeypatch):
  monkeypatch.setattr(run, "_OWN_RUN", set())
  for experiment in run.EXPERIMENTS.values():
    for arm in experiment.arms:
      if arm.same_as:
        run.check_same_as(experiment, arm, "mini", tmp_path, [])
      elif not arm.reuse:
        settings = run.settings(experiment, arm, "mini", tmp_path, [])
        assert settings["TRAIN_STEPS"] > 0 and settings["MESH_SHAPE"] == (1, 1, 1)
  assert not run._OWN_RUN  # in miniature, every "same as" arm is that run
  scaling = run.EXPERIMENTS["01_scaling"]
  assert [run.settings(scaling, arm, "mini", tmp_path, [])["num_experts"]
          for arm in scaling.arms] == [0, 2, 4, 8, 16, 32, 0, 0, 8, 8]
  # A declared "same run" that is not one is found before anything trains.
  router = run.EXPERIMENTS["02_capacity_router"]
  wrong = run.Arm("top1-cf1.25", ("ModelConfig.train_capacity_factor = 1.5",),
                  same_as="01_scaling/switch-8")
  assert run.differences(router, wrong, "mini", tmp_path, []) == {
      "train_capacity_factor": (1.5, 1.25)}


def test_arms_wire_checkpoints_and_the_full_scale(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(run, "_OWN_RUN", set())
  monkeypatch.setattr(run, "_HANDLED", set())
  finetune = run.EXPERIMENTS["05_finetune"]
  settings = run.settings(finetune, finetune.arms[3], "mini", tmp_path, [])
  assert settings["InitConfig.checkpoint_path"] == repr(
      str(tmp_path / "01_scaling" / "switch-8"))
  assert (settings["expert_dropout_rate"], settings["dropout_rate"]) == (0.4, 0.1)
  assert settings["MIXTURE_OR_TASK_NAME"] == "embedded_continuation"
  distill = run.EXPERIMENTS["06_distillation"]
  settings = run.settings(distill, distill.arms[2], "mini", tmp_path, [])
  assert settings["num_experts"] == 0
  assert settings["DistillConfig.teacher_checkpoint_path"] == repr(
      str(tmp_path / "01_scaling" / "switch-8"))
  init_only = run.settings(distill, distill.arms[3], "mini", tmp_path, [])
  assert init_only["DistillConfig.teacher_checkpoint_path"] == "None"
  assert init_only["InitConfig.checkpoint_path"] == settings["InitConfig.checkpoint_path"]
  full = run.settings(finetune, finetune.arms[1], "full", tmp_path, [])
  assert (full["d_model"], full["num_experts"], full["dtype"]) == (768, 8, "bfloat16")
  assert full["MIXTURE_OR_TASK_NAME"] == "super_glue_v102_proportional"
  assert run.main(["all", "--scale", "full", "--print_commands",
                   f"--output_dir={tmp_path}", "--gin.MESH_SHAPE=(4, 2, 1)"]) == 0
  out = capsys.readouterr().out
  # At full scale every run is bfloat16, so 03's float32 arm is its own run.
  assert "03_precision/float32 differs from 01_scaling/switch-8" in out
  commands = [line for line in out.splitlines() if line.startswith("switch-jax")]
  assert len(commands) == 27  # every arm that trains, once, dependencies first
  float32 = next(c for c in commands if "03_precision/float32" in c)
  assert float32.index("paper/full.gin") < float32.index("precision/float32.gin")
  assert all("--gin.MESH_SHAPE=(4, 2, 1)" in c and "paper/full.gin" in c for c in commands)


def _fake_run(directory, final_loss, seconds_per_step=0.5, dropped=None, task_accuracy=None):
  import json  # pylint: disable=import-outside-toplevel
  directory.mkdir(parents=True)
  lines = []
  for step in (10, 20, 30, 40):
    record = {"split": "train", "step": step, "loss": 7.0, "seconds_per_step": seconds_per_step}
    if dropped is not None:
      record["fraction_dropped"] = dropped
    lines.append(record)
  for step, excess in ((20, 0.4), (40, 0.0)):
    lines.append({"split": "eval", "step": step, "cross_entropy": final_loss + excess,
                  "accuracy": 0.05, "router/aux_loss": 1.2, "router/fraction_dropped": 0.01})
    if task_accuracy is not None:
      lines[-1]["embedded_continuation/accuracy"] = task_accuracy - excess * 10
  (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_reports_from_metrics(tmp_path, monkeypatch):
  scaling = run.EXPERIMENTS["01_scaling"]
  for arm, loss in zip(scaling.arms, (6.0, 5.9, 5.8, 5.7, 5.6, 5.5)):
    _fake_run(tmp_path / "01_scaling" / arm.name, loss, seconds_per_step=0.25 + 0.05 * loss)
  for seed, (dense, switch) in ((1, (6.1, 6.0)), (2, (6.2, 6.3))):
    _fake_run(tmp_path / "01_scaling" / f"dense-seed{seed}", dense)
    _fake_run(tmp_path / "04_init_scale" / f"init0.1-seed{seed}", switch)
  for name in run.EXPERIMENTS:
    monkeypatch.setitem(run._OUTPUTS, name, tmp_path / "out" / name)
  summary = run.report(scaling, tmp_path)
  # switch-2 reaches 6.0 at 20 + 20 * (6.3 - 6.0) / 0.4 = 35 steps: 40 / 35.
  assert summary["switch-2"]["step_speedup_to_dense_final"] == pytest.approx(40 / 35)
  dense_seconds, switch_seconds = 40 * 0.55, 40 * 0.545 * 35 / 40
  assert summary["switch-2"]["time_speedup_to_dense_final"] == pytest.approx(
      dense_seconds / switch_seconds)
  # The gap over three seeds: 0.3, 0.1 and -0.1 nats.
  assert summary["seeds"]["dense_minus_switch8"] == pytest.approx([0.3, 0.1, -0.1])
  assert (summary["seeds"]["mean"], summary["seeds"]["std"]) == pytest.approx((0.1, 0.2))
  written = (tmp_path / "out" / "01_scaling" / "results.md").read_text()
  assert "| switch-32 |" in written and "loss_vs_time.png" in written
  assert (tmp_path / "out" / "01_scaling" / "loss_vs_step.png").stat().st_size > 1000
  router = run.EXPERIMENTS["02_capacity_router"]
  for arm in router.arms:
    if not arm.same_as:
      _fake_run(tmp_path / "02_capacity_router" / arm.name, 6.0, dropped=0.25)
  summary = run.report(router, tmp_path)
  assert summary["dropless"]["train_dropped_mean"] == 0.25
  assert summary["top1-cf1.25"]["final_val_cross_entropy"] == 5.7  # 01_scaling/switch-8
  assert summary["dropless"]["val_dropped"] == 0.01
  finetune = run.EXPERIMENTS["05_finetune"]
  for i, arm in enumerate(finetune.arms):
    _fake_run(tmp_path / "05_finetune" / arm.name, 1.0, task_accuracy=60.0 + i)
  summary = run.report(finetune, tmp_path)
  assert summary["switch-d0.1-ed0.4"]["final_accuracy"] == 63.0
  assert summary["switch-d0.1-ed0.4"]["accuracy_by_step"] == [(20, 59.0), (40, 63.0)]
  _fake_run(tmp_path / "06_distillation" / "distilled", 5.94)
  _fake_run(tmp_path / "06_distillation" / "init-only", 5.96)
  summary = run.report(run.EXPERIMENTS["06_distillation"], tmp_path)
  assert summary["share_of_gain_kept"] == pytest.approx(0.06 / 0.3)
  assert summary["soft_targets_gain"] == pytest.approx(0.02)


def test_encoder_probe_swaps_inputs_and_keeps_targets():
  import numpy as np  # pylint: disable=import-outside-toplevel
  import encoder_probe  # pylint: disable=import-outside-toplevel
  batch = {"encoder_input_tokens": np.arange(6).reshape(3, 2),
           "decoder_target_tokens": np.arange(3)[:, None]}
  swapped = encoder_probe.swap_inputs(batch)
  assert swapped["encoder_input_tokens"].tolist() == [[4, 5], [0, 1], [2, 3]]
  assert swapped["decoder_target_tokens"] is batch["decoder_target_tokens"]
