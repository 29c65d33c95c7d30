"""What users watch: MODEL_DIR/metrics.jsonl, TensorBoard summaries and a
console progress line with an ETA.

Each logged step is one JSON object: step, the `METRICS` the step has (loss
and its terms, accuracy, router statistics, gradient norm), per-layer
expert load, learning rate, tokens/s and seconds per step. Evaluations are
records of split "eval" with the same names. Appending (never rewriting)
keeps the file whole across restarts. On a bucket (gs://) the records go
up in parts, metrics-NNNNN.jsonl, at each checkpoint (`MetricsLogger`);
`read_records` reads either layout.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Mapping, Optional

import numpy as np
from etils import epath

from switch_jax import storage

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
LAYER_NAMES_KEY = "expert_load_layers"  # a train record's Switch layer names, as the trainer adds
TENSORBOARD_DIR = "tensorboard"
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
  """Writes records to metrics.jsonl and TensorBoard, and prints progress.

  In a local MODEL_DIR each record is appended to metrics.jsonl at once and
  TensorBoard's event files are flushed at every write. A bucket cannot
  append, so there both go to a local staging folder first, and `sync`
  uploads what is new: the new lines as the next part, metrics-NNNNN.jsonl
  (`read_records` reads the parts in order), and the event files written
  since (closed, then started afresh). Each byte goes up once. The trainer
  syncs after every checkpoint save; `close` syncs, and so does a write
  `sync_seconds` after the last sync. A crash loses the records since the
  last sync, at most those after the last checkpoint, which the resumed
  run logs again.

  TensorBoard gets one run per split (tensorboard/train, tensorboard/eval,
  ...): each scalar under its recorded name, the expert load as one
  histogram per Switch layer (expert_load/<layer>) with the largest and
  smallest expert's share as multiples of the balanced share
  (expert_load_max/<layer>, expert_load_min/<layer>), and the run's
  config.gin and its bindings (hparams) as text.
  """

  def __init__(self, model_dir, total_steps: int, *, enabled: bool = True,
               tensorboard: bool = True, stream=None, filename: str = "metrics.jsonl",
               sync_seconds: float = 600.0):
    self.enabled = enabled  # only process 0 writes
    self.total_steps = total_steps
    self.stream = stream or sys.stdout
    self.model_dir = storage.path(model_dir)
    self.remote = storage.is_bucket(self.model_dir)
    self.sync_seconds = sync_seconds
    self.uploaded_bytes = 0  # bytes sent to the bucket by `sync`
    self._stem = filename.rsplit(".", 1)[0]
    self._stage = (epath.Path(tempfile.mkdtemp(prefix="switch_jax-run-"))
                   if enabled and self.remote else None)
    self.path = (self._stage or self.model_dir) / filename
    self._next_part = _next_part(self.model_dir, self._stem) if self._stage else 0
    self._last_sync = time.monotonic()
    self._events = (_Events(self._stage or self.model_dir, self.model_dir)
                    if enabled and tensorboard else None)
    self._start = time.monotonic()
    self._start_step: Optional[int] = None

  def write(self, record: Mapping, prefix: str = "train") -> None:
    if not self.enabled:
      return
    line = json.dumps({"split": prefix, **record}, sort_keys=True) + "\n"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line)
    if self._events is not None:
      self._events.write(record, prefix)
    if self.remote and time.monotonic() - self._last_sync >= self.sync_seconds:
      self.sync()

  def sync(self) -> bool:
    """Uploads what is new since the last sync to the bucket (a no-op for a
    local MODEL_DIR, which is written in place). An upload that fails is
    reported and kept here for the next sync, so training goes on; returns
    whether everything went up."""
    self._last_sync = time.monotonic()
    if not self.enabled or not self.remote:
      return True
    try:
      if os.path.isfile(self.path) and os.path.getsize(self.path):
        part = self.model_dir / f"{self._stem}-{self._next_part:05d}.jsonl"
        data = self.path.read_bytes()
        part.write_bytes(data)
        self.uploaded_bytes += len(data)
        self.path.unlink()
        self._next_part += 1
      if self._events is not None:
        self.uploaded_bytes += self._events.upload(self.model_dir)
    except Exception as e:  # the network, credentials, quota: retried at the next sync
      print(f"WARNING: metrics not uploaded to {self.model_dir} yet "
            f"({storage.describe_error(e)}); kept in {self._stage}",
            file=self.stream, flush=True)
      return False
    return True

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
    if self._events is not None:
      self._events.close()
    if self.sync() and self._stage is not None:  # a failed upload's files stay for the user
      shutil.rmtree(self._stage, ignore_errors=True)
      self._stage = None


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX
  imports torch when it is installed only to accept its tensors, which we
  never pass, and that import is most of its cost (1.4 of 1.5 s measured,
  more under load, in every training process)."""
  hidden = "torch" not in sys.modules
  if hidden:
    sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if hidden:
      del sys.modules["torch"]
  return SummaryWriter


class _Events:
  """TensorBoard event files under LOG_ROOT/tensorboard/<split>/, through
  tensorboardX (which writes them without TensorFlow or TensorBoard)."""

  def __init__(self, log_root: epath.Path, model_dir: epath.Path):
    self.root = log_root / TENSORBOARD_DIR
    self.model_dir = model_dir
    self._writers: dict = {}
    self._opened = 0  # event files started: a unique suffix for each
    self._config_written = False
    self._layers: Optional[list] = None

  def _writer(self, split: str):
    if split not in self._writers:
      self._writers[split] = _summary_writer_class()(str(self.root / split), flush_secs=3600,
                                           filename_suffix=f".{os.getpid()}.{self._opened}")
      self._opened += 1
      if split == "train" and not self._config_written:
        self._write_config(self._writers[split])
        self._config_written = True
    return self._writers[split]

  def _write_config(self, writer) -> None:
    """config.gin and its bindings as text, from MODEL_DIR/config.gin."""
    config = self.model_dir / "config.gin"
    if not config.is_file():
      return
    text = config.read_text()
    writer.add_text("config.gin", "\n".join("    " + line for line in text.splitlines()), 0)
    rows = [line.split(" = ", 1) for line in text.splitlines()
            if " = " in line and not line.startswith(("#", " "))]
    table = "| binding | value |\n|---|---|\n" + "\n".join(
        f"| {name.strip()} | {value.strip()} |" for name, value in rows)
    writer.add_text("hparams", table, 0)

  def write(self, record: Mapping, split: str) -> None:
    writer = self._writer(split)
    step = int(record["step"])
    for name, value in record.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
        writer.add_scalar(name, value, step)
    load = record.get(EXPERT_LOAD)
    if load:
      layers = record.get(LAYER_NAMES_KEY) or self._layers
      if not layers or len(layers) != len(load):
        layers = [f"layer_{i}" for i in range(len(load))]
      self._layers = list(layers)
      for layer, shares in zip(layers, load):
        shares = np.asarray(shares, np.float64)
        # 16 bins, not tensorboardX's ~1.5 KB default: a Switch-Base-128 log is ~13 KB.
        writer.add_histogram(f"{EXPERT_LOAD}/{layer}", shares, step, bins=16)
        writer.add_scalar(f"{EXPERT_LOAD}_max/{layer}", float(shares.max() * shares.size), step)
        writer.add_scalar(f"{EXPERT_LOAD}_min/{layer}", float(shares.min() * shares.size), step)
    writer.flush()

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers = {}

  def upload(self, model_dir: epath.Path) -> int:
    """Closes the event files, copies them to MODEL_DIR/tensorboard and
    removes them here; the next write starts new ones. Returns the bytes."""
    self.close()
    sent = 0
    if not self.root.is_dir():
      return sent
    root = pathlib.Path(self.root)  # local: epath refuses rglob
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
      target = model_dir / TENSORBOARD_DIR / str(file.relative_to(root))
      data = file.read_bytes()
      target.write_bytes(data)
      sent += len(data)
      file.unlink()
    return sent


def _next_part(model_dir: epath.Path, stem: str) -> int:
  numbers = [int(p.name[len(stem) + 1:-len(".jsonl")]) for p in _parts(model_dir, stem)]
  return max(numbers, default=-1) + 1


def _parts(model_dir: epath.Path, stem: str = "metrics") -> list[epath.Path]:
  """MODEL_DIR's metrics-NNNNN.jsonl parts (a bucket run's), in order."""
  if not model_dir.is_dir():
    return []
  return sorted(p for p in model_dir.glob(f"{stem}-*.jsonl")
                if p.name[len(stem) + 1:-len(".jsonl")].isdigit())


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "--:--"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def metrics_files(model_dir) -> list[epath.Path]:
  """The files holding a run's records, in order: the parts a run on a
  bucket uploads (metrics-NNNNN.jsonl), then metrics.jsonl."""
  model_dir = storage.path(model_dir)
  files = _parts(model_dir)
  if (model_dir / "metrics.jsonl").is_file():
    files.append(model_dir / "metrics.jsonl")
  return files


def read_records(model_dir, split: Optional[str] = "train") -> list[dict]:
  """The records of a run (of one split), skipping a torn last line."""
  records = []
  for path in metrics_files(model_dir):
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a crash
        continue
      if split is None or record.get("split") == split:
        records.append(record)
  return records
