"""What users watch: MODEL_DIR/metrics.jsonl, TensorBoard summaries and a
console progress line with an ETA.

Each logged step is one JSON object: step, loss, accuracy, aux and z
losses, fraction of tokens dropped, per-layer expert load, learning rate,
tokens/s and seconds per step. Appending (never rewriting) keeps the file
whole across restarts; a resumed run's first line repeats no earlier step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Mapping, Optional

import numpy as np
from etils import epath

SCALARS = {
    "loss": "loss", "cross_entropy": "cross_entropy", "accuracy": "accuracy",
    "z_loss": "output_z_loss", "router_aux_loss": "router_aux_loss",
    "router_z_loss": "router_z_loss", "router/fraction_dropped": "fraction_dropped",
    "router/router_confidence": "router_confidence", "grad_norm": "grad_norm",
    "teacher_cross_entropy": "teacher_cross_entropy", "finite": "finite",
}


def to_record(step: int, metrics: Mapping, *, learning_rate: float, tokens: float,
              seconds_per_step: float) -> dict:
  """A JSON-ready record of one step's (device) metrics."""
  record = {"step": int(step)}
  for key, name in SCALARS.items():
    if key in metrics:
      record[name] = float(np.asarray(metrics[key]))
  if "router/expert_fraction_per_layer" in metrics:
    record["expert_load"] = np.round(np.asarray(metrics["router/expert_fraction_per_layer"]),
                                     5).tolist()
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
      for layer, load in enumerate(record.get("expert_load", [])):
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
