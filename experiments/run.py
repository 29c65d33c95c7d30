#!/usr/bin/env python
"""Run (or resume) the paper's experiments and regenerate their results.

    python experiments/run.py 01_scaling           # one experiment, miniature
    python experiments/run.py all                  # all six, in order (~75 min on 2 cores)
    python experiments/run.py 02_capacity_router --report_only   # tables and plots again
    python experiments/run.py 01_scaling --scale full --print_commands \\
        --gin.c4_vocabulary_path.path=\\"/data/vocab/spm.model\\" --gin.MESH_SHAPE="(-1, 2, 1)" \\
        --tfds_data_dir=/data/tensorflow_datasets

Every arm is one `switch-jax train` command (printed before it runs) on the
experiment's gin file plus the arm's bindings; each trains into
OUTPUT_DIR/<experiment>/<arm>/ and re-running resumes or skips it. Then
the script reads the arms' metrics.jsonl and writes, into the experiment's
folder (miniature) or OUTPUT_DIR/<experiment>/ (full), `results.json`,
`results.md` (the tables) and the plots. The written conclusions are each
experiment's README.md.

An arm "same as" another experiment's arm is that run when their settings
are equal (checked before anything trains; at full scale some differ, and
then the arm trains its own run); an arm that "reuses" one (the
distillation's teacher and dense baseline) shows that run's results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import analysis  # noqa: E402  pylint: disable=wrong-import-position


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  bindings: tuple[str, ...] = ()
  gin_files: tuple[str, ...] = ()      # after the experiment's file, e.g. precision/*.gin
  initial: Optional[str] = None        # "<experiment>/<arm>" whose checkpoint starts this one
  teacher: Optional[str] = None        # "<experiment>/<arm>" to distill from
  same_as: Optional[str] = None        # "<experiment>/<arm>" that is this very run (checked)
  reuse: Optional[str] = None          # "<experiment>/<arm>" whose results this arm shows


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str
  gin_file: str
  arms: tuple[Arm, ...]
  report: Callable[["Experiment", dict], tuple[dict, str, list]]
  full_bindings: tuple[str, ...] = ()  # what else the paper-scale run changes


def experts(n: int) -> str:
  return f"ModelConfig.num_experts = {n}"


# ----------------------------------------------------------------------------- reports

def _load(run_dir: Path) -> dict:
  from switch_jax import run_logging  # pylint: disable=import-outside-toplevel
  train = run_logging.read_records(run_dir, "train")
  evals = run_logging.read_records(run_dir, "eval")
  if not train or not evals:
    raise SystemExit(f"{run_dir} has no train or eval records: run it first")
  steps, losses = analysis.curve(evals, "cross_entropy")
  seconds = analysis.training_seconds(train)
  final = evals[-1]
  dropped = [r["fraction_dropped"] for r in train if "fraction_dropped" in r]
  out = {
      "steps": steps, "val_cross_entropy": losses,
      "val_seconds": [analysis.time_at(seconds, s) for s in steps],
      "final_val_cross_entropy": final["cross_entropy"],
      "final_val_accuracy": final.get("accuracy"),
      "final_train_loss": train[-1].get("cross_entropy", train[-1].get("loss")),
      # The first logged window holds the compiled first step's neighbours: skip it.
      "seconds_per_step": analysis.median([r["seconds_per_step"] for r in train[1:] or train]),
      "train_seconds": seconds[max(seconds)],
      "nonfinite_steps": sum(1 for r in train if r.get("finite") == 0.0),
  }
  if dropped:
    out["train_dropped_mean"] = sum(dropped) / len(dropped)
    out["train_dropped_final"] = dropped[-1]
  if analysis.eval_fraction_dropped(final) is not None:
    out["val_dropped"] = analysis.eval_fraction_dropped(final)
  if "expert_load" in final:
    out["val_expert_load"] = final["expert_load"]
    out["val_dead_experts"] = sum(1 for layer in final["expert_load"] for x in layer if x == 0)
  # The task's own metrics (e.g. "embedded_continuation/accuracy"), not the router's.
  metric_keys = analysis.task_metric_names(final)
  out["task_metrics"] = {k: final[k] for k in metric_keys}
  out["task_metrics_by_step"] = {
      k: [(r["step"], r[k]) for r in evals if k in r] for k in metric_keys}
  parameters = _parameters(run_dir)
  if parameters:
    out["parameters"] = parameters
  return out


def _parameters(run_dir: Path) -> Optional[dict]:
  from switch_jax.model import param_count  # pylint: disable=import-outside-toplevel
  from switch_jax.checkpoints import model_format  # pylint: disable=import-outside-toplevel
  from switch_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  try:
    return param_count.count_params(model_format.load_config(run_dir))
  except UserError:  # no checkpoint (yet): the table leaves the count out
    return None


def _fmt(value, digits=4) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def _plot_curves(results: dict, out_dir: Path, x: str, filename: str, title: str) -> Path:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for name, r in results.items():
    xs = r["steps"] if x == "step" else r["val_seconds"]
    ax.plot(xs, r["val_cross_entropy"], "o-", markersize=3, label=name)
  ax.set_xlabel("step" if x == "step" else "training seconds (2-core CPU)")
  ax.set_ylabel("validation cross-entropy (nats/token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = out_dir / filename
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def report_scaling(experiment, results):
  seeded = {name: r for name, r in results.items() if "-seed" in name}
  results = {name: r for name, r in results.items() if name not in seeded}
  dense = results["dense"]
  rows, summary = [], {}
  for name, r in results.items():
    speedup = (None if name == "dense" else analysis.speedup_to_reach(
        dense["steps"], dense["val_cross_entropy"], r["steps"], r["val_cross_entropy"]))
    time_speedup = None
    if speedup:
      reached = analysis.first_reaching(r["steps"], r["val_cross_entropy"],
                                        dense["final_val_cross_entropy"])
      # seconds to the dense model's final loss, from this arm's own step times
      seconds = r["train_seconds"] * reached / r["steps"][-1]
      time_speedup = dense["train_seconds"] / seconds
    summary[name] = {"final_val_cross_entropy": r["final_val_cross_entropy"],
                     "step_speedup_to_dense_final": speedup,
                     "time_speedup_to_dense_final": time_speedup,
                     "seconds_per_step": r["seconds_per_step"],
                     "train_dropped_mean": r.get("train_dropped_mean")}
    params = r.get("parameters", {})
    rows.append([name, params.get("total"), r["final_val_cross_entropy"],
                 r["final_val_accuracy"], dense["final_val_cross_entropy"] - r[
                     "final_val_cross_entropy"], r["seconds_per_step"], speedup, time_speedup,
                 r.get("train_dropped_mean")])
  table = _table(["arm", "parameters", "val CE", "val acc", "dense - arm", "s/step",
                  "step speedup to dense final", "time speedup", "train dropped (mean)"], rows)
  if seeded:
    runs = {0: (dense, results["switch-8"])}
    runs.update({seed: (seeded[f"dense-seed{seed}"], seeded[f"switch-8-seed{seed}"])
                 for seed in (1, 2) if f"dense-seed{seed}" in seeded})
    gaps = [d["final_val_cross_entropy"] - s["final_val_cross_entropy"] for d, s in runs.values()]
    mean, std = analysis.mean_std(gaps)
    summary["seeds"] = {"dense_minus_switch8": gaps, "mean": mean, "std": std,
                        "dense_seconds_per_step": [d["seconds_per_step"] for d, _ in runs.values()],
                        "switch8_seconds_per_step": [s["seconds_per_step"]
                                                     for _, s in runs.values()]}
    table += "\n\n" + _table(
        ["seed", "dense val CE", "8 experts val CE", "dense - 8 experts", "dense s/step",
         "8 experts s/step"],
        [[seed, d["final_val_cross_entropy"], s["final_val_cross_entropy"], gap,
          d["seconds_per_step"], s["seconds_per_step"]]
         for (seed, (d, s)), gap in zip(runs.items(), gaps)])
    table += f"\n\nDense - 8 experts over {len(gaps)} seeds: {mean:+.4f} ± {std:.4f} (std)"
  out = _out_dir(experiment)
  plots = [_plot_curves(results, out, "step", "loss_vs_step.png", "Validation loss vs step"),
           _plot_curves(results, out, "seconds", "loss_vs_time.png",
                        "Validation loss vs training time")]
  return summary, table, plots


def _loss_plot(experiment, results, title="Validation loss vs step") -> Path:
  return _plot_curves(results, _out_dir(experiment), "step", "loss_vs_step.png", title)


def _column_report(columns: Sequence[tuple[str, str]]):
  """A report with one row per arm and a column per (header, result key)."""
  def report(experiment, results):
    summary = {name: {key: r.get(key) for _, key in columns} for name, r in results.items()}
    rows = [[name, *(r.get(key) for _, key in columns)] for name, r in results.items()]
    table = _table(["arm", *(header for header, _ in columns)], rows)
    return summary, table, [_loss_plot(experiment, results)]
  return report


report_router = _column_report([
    ("val CE", "final_val_cross_entropy"), ("val acc", "final_val_accuracy"),
    ("s/step", "seconds_per_step"), ("train dropped (mean)", "train_dropped_mean"),
    ("train dropped (last)", "train_dropped_final"),
    ("val dropped (eval)", "val_dropped")])
report_precision = _column_report([
    ("val CE", "final_val_cross_entropy"), ("val acc", "final_val_accuracy"),
    ("s/step", "seconds_per_step"), ("non-finite steps", "nonfinite_steps"),
    ("train dropped (mean)", "train_dropped_mean")])


def report_init(experiment, results):
  groups: dict[str, list] = {}
  for name, r in results.items():
    groups.setdefault(name.split("-seed")[0], []).append((name, r))
  rows, summary = [], {}
  for group, members in groups.items():
    finals = [r["final_val_cross_entropy"] for _, r in members]
    early = [r["val_cross_entropy"][0] for _, r in members]
    mean, std = analysis.mean_std(finals)
    early_mean, early_std = analysis.mean_std(early)
    summary[group] = {"final": finals, "mean": mean, "std": std,
                      "first_eval_step": members[0][1]["steps"][0],
                      "first_eval_mean": early_mean, "first_eval_std": early_std}
    rows.append([group, ", ".join(f"{v:.4f}" for v in finals), mean, std,
                 early_mean, early_std])
  table = _table(["arm", "val CE per seed", "mean", "std", "first eval mean",
                  "first eval std"], rows)
  return summary, table, [_loss_plot(experiment, results, "Validation loss vs step, every seed")]


def report_finetune(experiment, results):
  rows, summary = [], {}
  for name, r in results.items():
    metric = next(iter(r["task_metrics"]), None)
    by_step = r["task_metrics_by_step"].get(metric, []) if metric else []
    summary[name] = {"final_accuracy": r["task_metrics"].get(metric) if metric else None,
                     "best_accuracy": max((v for _, v in by_step), default=None),
                     "accuracy_by_step": by_step,
                     "final_val_cross_entropy": r["final_val_cross_entropy"]}
    rows.append([name, summary[name]["final_accuracy"], summary[name]["best_accuracy"],
                 ", ".join(f"{v:.1f}" for _, v in by_step), r["final_val_cross_entropy"]])
  table = _table(["arm", "val accuracy (last)", "best", "by evaluation",
                  "val CE (teacher-forced)"], rows)
  return summary, table, [_loss_plot(experiment, results, "Fine-tuning validation loss vs step")]


def report_distill(experiment, results):
  dense, teacher, student = (results[k]["final_val_cross_entropy"]
                             for k in ("dense", "teacher", "distilled"))
  kept = analysis.share_of_gain_kept(dense, teacher, student) if teacher != dense else None
  summary = {"dense": dense, "teacher": teacher, "distilled": student,
             "teacher_gain": dense - teacher, "share_of_gain_kept": kept}
  names = [n for n in ("dense", "teacher", "distilled", "init-only") if n in results]
  rows = [[name, results[name].get("parameters", {}).get("total"),
           results[name]["final_val_cross_entropy"], results[name]["final_val_accuracy"]]
          for name in names]
  table = _table(["model", "parameters", "val CE", "val acc"], rows)
  table += (f"\n\nTeacher's gain over dense: {dense - teacher:+.4f} nats; "
            f"share kept by the distilled student: "
            f"{'-' if kept is None else f'{100 * kept:.0f}%'}")
  if "init-only" in results:
    init_only = results["init-only"]["final_val_cross_entropy"]
    summary["init_only"] = init_only
    summary["soft_targets_gain"] = init_only - student
    table += (f"\n\nThe same start without the teacher's soft targets: {init_only:.4f}; "
              f"the soft targets add {init_only - student:+.4f} nats")
  return summary, table, [_loss_plot(experiment, results)]


# ----------------------------------------------------------------------------- experiments

S8 = "01_scaling/switch-8"
EXPERIMENTS = {e.name: e for e in [
    Experiment(
        "01_scaling", "01_scaling/scaling.gin",
        (Arm("dense", (experts(0),)),
         *(Arm(f"switch-{n}", (experts(n),)) for n in (2, 4, 8, 16, 32)),
         # Seeds 1 and 2 of dense and 8 experts, for the spread of the gap.
         *(Arm(f"dense-seed{seed}", (experts(0), f"RANDOM_SEED = {seed}")) for seed in (1, 2)),
         *(Arm(f"switch-8-seed{seed}", (experts(8), f"RANDOM_SEED = {seed}"),
               same_as=f"04_init_scale/init0.1-seed{seed}") for seed in (1, 2))),
        report_scaling),
    Experiment(
        "02_capacity_router", "02_capacity_router/capacity_router.gin",
        (Arm("top1-cf1.0", ("ModelConfig.train_capacity_factor = 1.0",)),
         Arm("top1-cf1.25", same_as=S8),
         Arm("top1-cf2.0", ("ModelConfig.train_capacity_factor = 2.0",)),
         # The paper's MoE baseline: top-2 at cf 2.0 (slots = cf * S / E, as top-1).
         Arm("top2-cf2.0", ("ModelConfig.router = 'top2'",
                            "ModelConfig.train_capacity_factor = 2.0")),
         Arm("expert-choice-cf1.0", ("ModelConfig.router = 'expert_choice'",
                                     "ModelConfig.decoder_router = 'top1'",
                                     "ModelConfig.train_capacity_factor = 1.0")),
         Arm("dropless", ("ModelConfig.router = 'dropless'",))),
        report_router),
    Experiment(
        "03_precision", "03_precision/precision.gin",
        (Arm("float32", gin_files=("precision/float32.gin",), same_as=S8),
         Arm("bfloat16-f32-router", gin_files=("precision/bfloat16.gin",)),
         Arm("bfloat16-router", gin_files=("precision/bfloat16_router.gin",))),
        report_precision),
    Experiment(
        "04_init_scale", "04_init_scale/init_scale.gin",
        tuple(Arm(f"init{scale}-seed{seed}",
                  (f"ModelConfig.init_scale = {scale}", f"RANDOM_SEED = {seed}"),
                  same_as=S8 if (scale, seed) == (0.1, 0) else None)
              for scale in (0.1, 1.0) for seed in (0, 1, 2)),
        report_init),
    Experiment(
        "05_finetune", "05_finetune/finetune.gin",
        (Arm("dense-d0.1", (experts(0),), initial="01_scaling/dense"),
         Arm("switch-d0.1", initial=S8),
         Arm("switch-d0.3", ("ModelConfig.dropout_rate = 0.3",), initial=S8),
         Arm("switch-d0.1-ed0.4", ("ModelConfig.expert_dropout_rate = 0.4",), initial=S8)),
        report_finetune,
        full_bindings=("MIXTURE_OR_TASK_NAME = 'super_glue_v102_proportional'",
                       "TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 62}",
                       "TRAIN_STEPS = 10000", "BATCH_SIZE = 128",
                       "train.learning_rate = @constant_schedule()",
                       "constant_schedule.value = 1e-3", "EvalConfig.period = 200")),
    Experiment(
        "06_distillation", "06_distillation/distillation.gin",
        (Arm("dense", reuse="01_scaling/dense"),
         Arm("teacher", reuse=S8),
         Arm("distilled", teacher=S8),
         # The same start from the teacher's weights, ground truth only: what
         # the soft targets add beyond the initialization.
         Arm("init-only", ("DistillConfig.teacher_checkpoint_path = None",), teacher=S8)),
        report_distill),
]}


# ----------------------------------------------------------------------------- running

def _out_dir(experiment: Experiment) -> Path:
  return _OUTPUTS[experiment.name]


_OUTPUTS: dict[str, Path] = {}


def resolve(ref: str) -> tuple[Experiment, Arm]:
  experiment_name, arm_name = ref.split("/")
  experiment = EXPERIMENTS[experiment_name]
  return experiment, next(a for a in experiment.arms if a.name == arm_name)


def gin_files(experiment: Experiment, arm: Arm, scale: str) -> list[str]:
  path = HERE / experiment.gin_file
  inside = Path.cwd() in path.parents  # keep the printed commands short and copyable
  files = [os.path.relpath(path) if inside else str(path)]
  return files + (["paper/full.gin"] if scale == "full" else []) + list(arm.gin_files)


def bindings(experiment: Experiment, arm: Arm, scale: str, output_dir: Path,
             extra: Sequence[str]) -> list[str]:
  out = list(experiment.full_bindings) if scale == "full" else []
  path = lambda ref_arm: json.dumps(str(run_dir(*ref_arm, output_dir)))
  out += [*arm.bindings, f"MODEL_DIR = {path((experiment, arm))}"]
  if arm.initial:
    out.append(f"INITIAL_CHECKPOINT_PATH = {path(resolve(arm.initial))}")
  if arm.teacher:
    out.append(f"TEACHER_CHECKPOINT_PATH = {path(resolve(arm.teacher))}")
  return out + list(extra)


def own_dir(experiment: Experiment, arm: Arm, output_dir: Path) -> Path:
  return output_dir / experiment.name / arm.name


def run_dir(experiment: Experiment, arm: Arm, output_dir: Path) -> Path:
  """Where the arm's run is: its own folder, or the other run it is."""
  if (arm.same_as or arm.reuse) and (experiment.name, arm.name) not in _OWN_RUN:
    return run_dir(*resolve(arm.same_as or arm.reuse), output_dir)
  return own_dir(experiment, arm, output_dir)


def command(experiment, arm, scale, output_dir, extra) -> list[str]:
  args = [sys.executable, "-m", "switch_jax.cli.main", "train"]
  if scale == "mini":
    args.append("--num_cpu_devices=1")
  args += [f"--gin_file={f}" for f in gin_files(experiment, arm, scale)]
  return args + [f"--gin.{b.replace(' = ', '=', 1)}"
                 for b in bindings(experiment, arm, scale, output_dir, extra)]


def settings(experiment, arm, scale, output_dir, extra) -> dict:
  """What a run trains: its model config and run macros, parsed from gin."""
  import gin  # pylint: disable=import-outside-toplevel
  from switch_jax.cli import gin_config  # pylint: disable=import-outside-toplevel
  gin_config.parse(gin_files(experiment, arm, scale),
                   bindings(experiment, arm, scale, output_dir, extra))
  out = dataclasses.asdict(gin.get_configurable("ModelConfig")())
  for key in ("MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "TRAIN_STEPS", "BATCH_SIZE",
              "RANDOM_SEED", "MESH_SHAPE"):
    out[key] = gin_config.query(f"{key}/macro.value")
  for key in ("train.optimizer", "train.learning_rate", "EvalConfig.period",
              "EvalConfig.steps", "DistillConfig.teacher_checkpoint_path",
              "InitConfig.checkpoint_path"):
    try:
      out[key] = repr(gin_config.query(key))
    except ValueError:
      out[key] = None
  return out


_OWN_RUN: set[tuple[str, str]] = set()  # "same as" arms whose settings differ: trained apart


def differences(experiment, arm, scale, output_dir, extra) -> dict:
  """{setting: (this arm's, the run's)} where a "same as" arm differs from its run."""
  mine = settings(experiment, dataclasses.replace(arm, same_as=None), scale, output_dir, extra)
  theirs = settings(*resolve(arm.same_as), scale, output_dir, extra)
  return {k: (mine[k], theirs.get(k)) for k in mine if mine[k] != theirs.get(k)}


def check_same_as(experiment, arm, scale, output_dir, extra) -> None:
  differ = differences(experiment, arm, scale, output_dir, extra)
  if differ:
    print(f"{experiment.name}/{arm.name} differs from {arm.same_as} at this scale "
          f"({differ}): it trains its own run", flush=True)
    _OWN_RUN.add((experiment.name, arm.name))


def is_done(directory: Path, total_steps: int) -> bool:
  summary = directory / "train_summary.json"
  return summary.is_file() and json.loads(summary.read_text()).get("step") == total_steps


_HANDLED: set[Path] = set()  # runs trained or printed by this invocation


def train_arm(experiment, arm, scale, output_dir, extra, print_only: bool) -> None:
  for ref in (arm.initial, arm.teacher):
    if ref:  # the checkpoints it starts from or distills come first
      train_arm(*resolve(ref), scale, output_dir, extra, print_only)
  directory = run_dir(experiment, arm, output_dir)
  if directory != own_dir(experiment, arm, output_dir):  # another experiment's run
    train_arm(*resolve(arm.same_as or arm.reuse), scale, output_dir, extra, print_only)
    return
  if directory in _HANDLED:
    return
  _HANDLED.add(directory)
  args = command(experiment, arm, scale, output_dir, extra)
  if print_only:
    print(shlex.join(["switch-jax", *args[3:]]), flush=True)
    return
  if is_done(directory, settings(experiment, arm, scale, output_dir, extra)["TRAIN_STEPS"]):
    return
  directory.mkdir(parents=True, exist_ok=True)
  print(f"\n[{experiment.name}/{arm.name}] {shlex.join(['switch-jax', *args[3:]])}", flush=True)
  start = time.time()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  with open(directory / "train.log", "a", encoding="utf-8") as log:
    proc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"{experiment.name}/{arm.name} failed (exit {proc.returncode}); "
                     f"see {directory / 'train.log'}")
  print(f"[{experiment.name}/{arm.name}] done in {time.time() - start:.0f} s", flush=True)


def report(experiment: Experiment, output_dir: Path) -> dict:
  results = {arm.name: _load(run_dir(experiment, arm, output_dir)) for arm in experiment.arms}
  out = _out_dir(experiment)
  out.mkdir(parents=True, exist_ok=True)
  summary, table, plots = experiment.report(experiment, results)
  (out / "results.json").write_text(json.dumps(
      {"summary": summary, "runs": results}, indent=1, default=float) + "\n")
  lines = [f"# {experiment.name}: generated results",
           "", f"Written by `python experiments/run.py {experiment.name}`; the "
           "conclusions are in README.md.", "", table, ""]
  lines += [f"![{p.stem}]({p.name})" for p in plots]
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print(f"\n## {experiment.name}\n{table}\nWrote {out / 'results.md'}", flush=True)
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("experiments", nargs="+",
                      help=f"'all' or any of {', '.join(EXPERIMENTS)}")
  parser.add_argument("--scale", choices=("mini", "full"), default="mini")
  parser.add_argument("--output_dir", default="runs/experiments",
                      help="where the arms train (OUTPUT_DIR/<scale>/<experiment>/<arm>)")
  parser.add_argument("--report_only", action="store_true",
                      help="train nothing; rewrite the tables and plots from the runs")
  parser.add_argument("--tfds_data_dir", default=None,
                      help="where TFDS datasets are prepared (full scale: C4, SuperGLUE)")
  parser.add_argument("--print_commands", action="store_true",
                      help="print each arm's train command and stop (e.g. to run on a pod)")
  args, unknown = parser.parse_known_args(argv)
  extra = []
  for flag in unknown:
    if not flag.startswith("--gin.") or "=" not in flag:
      parser.error(f"unknown argument {flag!r} (gin bindings are --gin.NAME=VALUE)")
    name, value = flag[len("--gin."):].split("=", 1)
    extra.append(f"{name} = {value}")
  if args.tfds_data_dir:
    extra.append(f"tfds_data_dir.path = {json.dumps(args.tfds_data_dir)}")
  names = list(EXPERIMENTS) if args.experiments == ["all"] else args.experiments
  for name in names:
    if name not in EXPERIMENTS:
      parser.error(f"no experiment {name!r}; choose from {', '.join(EXPERIMENTS)} or all")
  output_dir = Path(args.output_dir).absolute() / args.scale
  for name in EXPERIMENTS:
    _OUTPUTS[name] = HERE / name if args.scale == "mini" else output_dir / name
  for name in names:
    experiment = EXPERIMENTS[name]
    for arm in experiment.arms:
      if arm.same_as:
        check_same_as(experiment, arm, args.scale, output_dir, extra)
    if not args.report_only:
      for arm in experiment.arms:
        train_arm(experiment, arm, args.scale, output_dir, extra, args.print_commands)
    if not args.print_commands:
      report(experiment, output_dir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
