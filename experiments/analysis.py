"""The numbers the experiments report, computed from a run's metrics.jsonl
records: plain functions of lists, so tests can hold them to hand-worked
values (tests/test_experiments.py)."""

from __future__ import annotations

import math
import statistics
from statistics import median  # noqa: F401  (run.py's step-time summary)
from typing import Optional, Sequence


def curve(records: Sequence[dict], field: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the records that have `field` as a finite number."""
  points = [(int(r["step"]), float(r[field])) for r in records
            if isinstance(r.get(field), (int, float)) and math.isfinite(r[field])]
  return [s for s, _ in points], [v for _, v in points]


def eval_fraction_dropped(record: dict) -> Optional[float]:
  """An eval record's share of dropped assignments: "fraction_dropped" (the
  name training uses too), or "router/fraction_dropped" in records written
  before eval and training shared one naming."""
  for name in ("fraction_dropped", "router/fraction_dropped"):
    if isinstance(record.get(name), (int, float)):
      return float(record[name])
  return None


def task_metric_names(record: dict) -> list[str]:
  """The decoded task metrics of an eval record ("task/metric" and a
  mixture's "mixture/average"): not the router statistics of old records
  ("router/..."), nor a mixture's per-task teacher-forced "task/teacher_forced/..."."""
  return [k for k, v in record.items()
          if "/" in k and isinstance(v, (int, float)) and not k.startswith("router/")
          and "/teacher_forced/" not in k]


def training_seconds(train_records: Sequence[dict]) -> dict[int, float]:
  """Cumulative training time at each logged step: each record's mean
  seconds per step times the steps since the previous record. The first
  step (compilation), evaluations and checkpoints are not in it."""
  total, previous, out = 0.0, 0, {}
  for record in sorted(train_records, key=lambda r: r["step"]):
    step = int(record["step"])
    total += float(record.get("seconds_per_step", 0.0)) * (step - previous)
    previous = step
    out[step] = total
  return out


def time_at(seconds: dict[int, float], step: int) -> float:
  """Training seconds at `step`, interpolated between logged steps."""
  known = sorted(seconds.items())
  if not known:
    raise ValueError("no train records")
  previous_step, previous_time = 0, 0.0
  for s, t in known:
    if step <= s:
      return previous_time + (t - previous_time) * (step - previous_step) / (s - previous_step)
    previous_step, previous_time = s, t
  return known[-1][1]


def first_reaching(steps: Sequence[int], losses: Sequence[float],
                   target: float) -> Optional[float]:
  """The first step at which the loss curve reaches `target`, interpolated
  linearly between evaluations; None when it never does."""
  previous = None
  for step, loss in zip(steps, losses):
    if loss <= target:
      if previous is None:
        return float(step)
      (s0, l0) = previous
      return s0 + (step - s0) * (l0 - target) / (l0 - loss)
    previous = (step, loss)
  return None


def speedup_to_reach(baseline_steps: Sequence[int], baseline_losses: Sequence[float],
                     steps: Sequence[int], losses: Sequence[float]) -> Optional[float]:
  """The paper's "speedup": the baseline's steps to its final loss over the
  steps this curve needs to reach that loss (None if it never does)."""
  reached = first_reaching(steps, losses, baseline_losses[-1])
  return baseline_steps[-1] / reached if reached else None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def share_of_gain_kept(dense: float, teacher: float, student: float) -> float:
  """Tables 6-7: the share of the teacher's quality gain over the dense
  model that the distilled student keeps, from losses (lower is better)."""
  if teacher == dense:
    raise ValueError("the teacher is no better than the dense model: no gain to keep")
  return (dense - student) / (dense - teacher)

