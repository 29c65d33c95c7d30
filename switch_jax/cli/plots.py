"""PNGs of a run's metrics.jsonl (what `switch-jax plot` and the quickstart draw).

  loss.png         training loss by step, and eval loss where the run logged
                   eval records (split "eval"), of every task of a mixture too
  expert_load.png  per Switch layer: each expert's fraction of the tokens
                   over the steps (the largest and smallest beyond 16
                   experts), and a layer x expert heatmap of the last logged
                   step (a balanced router gives 1 / experts each)
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from etils import epath  # noqa: E402  pylint: disable=wrong-import-position

from switch_jax import run_logging, storage  # noqa: E402  pylint: disable=wrong-import-position
from switch_jax.errors import UserError  # noqa: E402  pylint: disable=wrong-import-position


_MAX_EXPERT_LINES = 16


def _series(records, field: str) -> tuple[list[int], list[float]]:
  points = [(r["step"], r[field]) for r in records
            if isinstance(r.get(field), (int, float)) and "step" in r]
  return [s for s, _ in points], [v for _, v in points]


def _task_losses(evals) -> dict[str, str]:
  """{task: its recorded eval loss name} of a mixture's eval records."""
  suffix = run_logging.task_metric("", "loss")  # "/teacher_forced/loss"
  return {name[:-len(suffix)]: name for name in sorted({k for r in evals for k in r})
          if name.endswith(suffix)}


def plot_loss(train, evals, path: epath.Path) -> epath.Path:
  fig, ax = plt.subplots(figsize=(7, 4))
  lines = [(train, "loss", "train loss", "-"), (evals, "loss", "eval loss", "o-")]
  lines += [(evals, name, f"eval loss: {task}", "o--")
            for task, name in _task_losses(evals).items()]
  for records, field, label, style in lines:
    steps, values = _series(records, field)
    if steps:
      ax.plot(steps, values, style, label=label, markersize=3)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path


def plot_expert_load(records, path: epath.Path) -> epath.Path:
  """One panel per layer (load over steps) and a heatmap of the last step."""
  steps = [r["step"] for r in records]
  load = np.asarray([r[run_logging.EXPERT_LOAD] for r in records], dtype=float)  # [T, layers, E]
  _, layers, experts = load.shape
  names = records[-1].get("expert_load_layers") or [str(i) for i in range(layers)]
  columns = min(layers, 4)
  rows = -(-layers // columns) + 1
  fig = plt.figure(figsize=(3.2 * columns + 1, 2.6 * rows))
  grid = fig.add_gridspec(rows, columns)
  for layer in range(layers):
    ax = fig.add_subplot(grid[layer // columns, layer % columns])
    if experts <= _MAX_EXPERT_LINES:
      for expert in range(experts):
        ax.plot(steps, load[:, layer, expert], linewidth=1)
    else:  # one line per expert would be unreadable: the busiest and idlest
      ax.plot(steps, load[:, layer].max(axis=1), linewidth=1, label="max")
      ax.plot(steps, load[:, layer].min(axis=1), linewidth=1, label="min")
      ax.legend(fontsize=7)
    ax.axhline(1.0 / experts, color="black", linestyle="--", linewidth=0.8)
    ax.set_title(f"Switch layer {names[layer]}", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("token fraction", fontsize=8)
  ax = fig.add_subplot(grid[rows - 1, :])
  image = ax.imshow(load[-1], aspect="auto", cmap="viridis", vmin=0.0)
  ax.set_title(f"expert load at step {steps[-1]} (expected {1.0 / experts:.3f} each)",
               fontsize=9)
  ax.set_xlabel("expert")
  ax.set_ylabel("Switch layer")
  ax.set_yticks(range(layers), names, fontsize=7)
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path


def _save(fig, path: epath.Path) -> None:
  """A PNG at `path`, local or on a bucket (through the file layer's open)."""
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=100)


def write_plots(model_dir, out=None) -> list[epath.Path]:
  """Writes loss.png (and expert_load.png for a Switch model); returns the paths."""
  model_dir = storage.path(model_dir)
  if not run_logging.metrics_files(model_dir):
    raise UserError(f"{model_dir} has no metrics.jsonl (nor metrics-*.jsonl parts); pass a "
                    "training run's directory")
  train = run_logging.read_records(model_dir, "train")
  evals = run_logging.read_records(model_dir, "eval")
  if not train and not evals:
    raise UserError(f"{model_dir}'s metrics hold no train or eval records")
  out = storage.path(out) if out else model_dir
  if not storage.is_bucket(out):
    out.mkdir(parents=True, exist_ok=True)
  written = [plot_loss(train, evals, out / "loss.png")]
  with_load = [r for r in train if r.get(run_logging.EXPERT_LOAD) and "step" in r]
  if with_load:
    shapes = {np.shape(r[run_logging.EXPERT_LOAD]) for r in with_load}
    if len(shapes) > 1:
      raise UserError(f"expert_load changes shape between records ({sorted(shapes)}); "
                      "does metrics.jsonl mix runs of different models?")
    written.append(plot_expert_load(with_load, out / "expert_load.png"))
  return written
