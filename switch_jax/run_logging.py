"""What users watch: MODEL_DIR/metrics.jsonl, TensorBoard summaries and a
console progress line with an ETA.

Each logged step is one JSON object: step, the `METRICS` the step has (loss
and its terms, accuracy, router statistics, gradient norm), per-layer
expert load, learning rate, tokens/s and seconds per step. Evaluations are
records of split "eval" with the same names. Appending (never rewriting)
keeps the file whole across restarts; a resumed run's first line repeats
no earlier step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Mapping, Optional

import numpy as np
from etils import epath

# The one naming of the metrics that training, evaluation (`switch-jax eval`,
# the trainer's eval records), TensorBoard and the plots share:
# {recorded name: (key in a step's metrics, `losses.total_loss`, what it is)}.
# Loss terms are recorded as they enter the loss, i.e. scaled by their
# factors: loss = cross_entropy + output_z_loss + router_aux_loss +
# router_z_loss (distillation mixes in teacher_cross_entropy). Token means
# are over real target tokens; router statistics are means over Switch layers.
METRICS = {
    "loss": ("loss", "the training objective, the sum of the scaled terms"),
    "cross_entropy": ("cross_entropy", "token negative log-likelihood (nats)"),
    "output_z_loss": ("output_z_loss", "z_loss * logsumexp(logits)^2 of the output softmax, "
                                       "scaled"),
    "accuracy": ("accuracy", "fraction of target tokens whose logit is the largest"),
    "router_aux_loss": ("router_aux_loss", "aux_loss_factor * load-balancing loss, scaled"),
    "router_z_loss": ("router_z_loss", "router_z_loss_factor * router z-loss, scaled"),
    "router_aux_loss_unscaled": ("router/aux_loss", "load-balancing loss before its factor: "
                                                    "1 at perfect balance"),
    "router_z_loss_unscaled": ("router/z_loss", "router z-loss before its factor"),
    "fraction_dropped": ("router/fraction_dropped", "share of expert assignments over "
                                                    "capacity (the token skips the expert)"),
    "router_confidence": ("router/router_confidence", "mean router probability of the "
                                                      "chosen experts"),
    "teacher_cross_entropy": ("teacher_cross_entropy", "cross-entropy against a distillation "
                                                       "teacher's softmax, unscaled"),
    "grad_norm": ("grad_norm", "global gradient norm (training only)"),
    "finite": ("finite", "1 if the step's loss and gradients were finite and it was applied "
                         "(training only)"),
}
# [layers][experts] token fractions, layers in `losses.switch_layer_names` order.
EXPERT_LOAD = "expert_load"
_EXPERT_FRACTION_KEY = "router/expert_fraction_per_layer"  # its key in a step's metrics
# An evaluation of a mixture records each task's teacher-forced metrics too,
# as "<task>/teacher_forced/<name>"; decoded task metrics are "<task>/<metric>".
TEACHER_FORCED = "teacher_forced"


def task_metric(task: str, name: str) -> str:
  """The recorded name of one task's teacher-forced metric `name`."""
  return f"{task}/{TEACHER_FORCED}/{name}"


def scalars(metrics: Mapping) -> dict[str, float]:
  """{recorded name: float} of the `METRICS` that `metrics` (a step's, or
  an evaluation's means, by their `losses` keys) holds."""
  return {name: float(np.asarray(metrics[key])) for name, (key, _) in METRICS.items()
          if key in metrics}


def expert_load(metrics: Mapping, decimals: int = 5) -> Optional[list]:
  """The [layers][experts] token fractions of a Switch model's metrics; None
  for a dense model."""
  if _EXPERT_FRACTION_KEY not in metrics:
    return None
  return np.round(np.asarray(metrics[_EXPERT_FRACTION_KEY], np.float64), decimals).tolist()


def to_record(step: int, metrics: Mapping, *, learning_rate: float, tokens: float,
              seconds_per_step: float) -> dict:
  """A JSON-ready record of one step's (device) metrics."""
  record = {"step": int(step), **scalars(metrics)}
  load = expert_load(metrics)
  if load is not None:
    record[EXPERT_LOAD] = load
  record["learning_rate"] = float(learning_rate)
  record["seconds_per_step"] = float(seconds_per_step)
  record["tokens_per_second"] = float(tokens / seconds_per_step) if seconds_per_step else 0.0
  return record


class MetricsLogger:
  """Writes records to metrics.jsonl and TensorBoard, and prints progress."""

  def __init__(self, model_dir, total_steps: int, *, enabled: bool = True,
               tensorboard: bool = True, stream=None, filename: str = "metrics.jsonl"):
    self.enabled = enabled  # only process 0 writes
    self.total_steps = total_steps
    self.stream = stream or sys.stdout
    self.path = epath.Path(model_dir) / filename
    # Buckets cannot append: keep the lines and rewrite the file instead.
    self._remote = "://" in str(self.path)
    self._lines = (self.path.read_text().splitlines(keepends=True)
                   if self._remote and enabled and self.path.exists() else [])
    self._writer = None
    self._start = time.monotonic()
    self._start_step: Optional[int] = None
    if enabled and tensorboard:
      # tensorboardX writes event files without TensorBoard itself installed.
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      try:
        self._writer = SummaryWriter(str(epath.Path(model_dir) / "tensorboard"))
      except Exception as e:  # e.g. a bucket tensorboardX cannot write to
        print(f"TensorBoard events disabled: {type(e).__name__}: {e}", file=self.stream)

  def write(self, record: Mapping, prefix: str = "train") -> None:
    if not self.enabled:
      return
    line = json.dumps({"split": prefix, **record}, sort_keys=True) + "\n"
    if self._remote:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)
    if self._writer is not None:
      step = int(record["step"])
      for name, value in record.items():
        if isinstance(value, (int, float)) and name != "step":
          self._writer.add_scalar(f"{prefix}/{name}", value, step)
      for layer, load in enumerate(record.get(EXPERT_LOAD, [])):
        self._writer.add_scalars(f"{prefix}/expert_load/layer_{layer}",
                                 {f"expert_{e}": share for e, share in enumerate(load)}, step)
      self._writer.flush()

  def progress(self, record: Mapping) -> None:
    """One console line: step, loss, throughput and the time left."""
    if not self.enabled:
      return
    step = int(record["step"])
    if self._start_step is None:
      self._start_step, self._start = step, time.monotonic()
    done = step - self._start_step
    elapsed = time.monotonic() - self._start
    eta = elapsed / done * (self.total_steps - step) if done > 0 else math.nan
    parts = [f"step {step}/{self.total_steps}", f"loss {record.get('loss', math.nan):.4f}"]
    if "fraction_dropped" in record:
      parts.append(f"dropped {record['fraction_dropped']:.3f}")
    parts.append(f"{record.get('tokens_per_second', 0):,.0f} tok/s")
    parts.append(f"ETA {_duration(eta)}")
    print("  ".join(parts), file=self.stream, flush=True)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "--:--"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_records(model_dir, split: Optional[str] = "train") -> list[dict]:
  """The records of metrics.jsonl (of one split), skipping a torn last line."""
  path = epath.Path(model_dir) / "metrics.jsonl"
  records = []
  if not path.is_file():
    return records
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a crash
      continue
    if split is None or record.get("split") == split:
      records.append(record)
  return records
