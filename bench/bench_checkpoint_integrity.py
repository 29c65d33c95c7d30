"""What checkpoint manifests cost: save and restore of a Base-sized training
state through `TrainCheckpointer`, with and without the manifest, and the
rate of the candidate hashes over the same files.

The state is random float32 arrays of the named model's parameter shapes
and its Adafactor state (no model is run): t5_base (~0.9 GB on disk) by
default, switch_base_8 (~2.5 GB) with --model. Each case is timed in
alternation with its baseline (A B A B ...), keeping the fastest run, so
another job's load slows both alike. The files are in the page cache when
they are hashed and restored (they were just written): a cold restore
reads them from the disk, and the check then costs one more read of each.

    python bench/bench_checkpoint_integrity.py [--model switch_base_8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import flax.linen as nn
import flax.struct
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# pylint: disable=wrong-import-position
from switch_jax.checkpoints import integrity, train_state
from switch_jax.config import get_config
from switch_jax.model.param_count import abstract_params
from switch_jax.training.optimizers import make_optimizer


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  opt_state: object


def random_state(model: str) -> State:
  """Random float32 arrays of `model`'s params and Adafactor state."""
  boxed = abstract_params(get_config(model))
  tx = make_optimizer("adafactor", 0.01, boxed_params=boxed)
  params = nn.unbox(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  rng = np.random.default_rng(0)

  def fill(leaf):
    return jax.device_put(rng.random(leaf.shape, dtype=np.float32) if leaf.dtype == np.float32
                          else np.zeros(leaf.shape, leaf.dtype))
  return State(step=jax.device_put(np.int32(0)), params=jax.tree.map(fill, params),
               opt_state=jax.tree.map(fill, opt_state))


def _with_manifests(on: bool):
  """Turns the manifest off (orbax's own temporary paths, no check) or on."""
  train_state.integrity.temporary_path_class = (
      _ORIGINAL_CLASS if on else (lambda directory: None))
  train_state.TrainCheckpointer._intact = (  # pylint: disable=protected-access
      _ORIGINAL_INTACT if on else (lambda self, step: True))


_ORIGINAL_CLASS = integrity.temporary_path_class
_ORIGINAL_INTACT = train_state.TrainCheckpointer._intact  # pylint: disable=protected-access


def save_and_restore(state: State, root: Path, manifests: bool) -> tuple[float, float]:
  """(save seconds, restore seconds) of one step, synchronous."""
  _with_manifests(manifests)
  model_dir = root / ("with" if manifests else "without")
  shutil.rmtree(model_dir, ignore_errors=True)
  checkpointer = train_state.TrainCheckpointer(model_dir, keep=1, async_save=False)
  start = time.perf_counter()
  checkpointer.save(1, state, get_config("tiny_switch"), {"batches": 1})
  checkpointer.wait()
  saved = time.perf_counter() - start
  checkpointer.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  checkpointer = train_state.TrainCheckpointer(model_dir, keep=1, async_save=False)
  start = time.perf_counter()
  restored = checkpointer.restore_latest(abstract)
  jax.block_until_ready(jax.tree.leaves(restored[1]))
  loaded = time.perf_counter() - start
  checkpointer.close()
  assert restored[0] == 1
  return saved, loaded


HASHES = {
    "sha256": lambda: hashlib.sha256(),
    "blake2b": lambda: hashlib.blake2b(),
    "sha1": lambda: hashlib.sha1(),
}


def hash_rates(step_dir: Path) -> dict[str, float]:
  """GB/s of each hash over the step's files (one thread, page cache)."""
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  total = sum(p.stat().st_size for p in files)
  rates = {}
  for name, make in HASHES.items():
    start = time.perf_counter()
    for p in files:
      digest = make()
      with open(p, "rb") as f:
        while chunk := f.read(1 << 24):
          digest.update(chunk)
    rates[name] = total / (time.perf_counter() - start) / 1e9
  start = time.perf_counter()
  for p in files:
    value = 0
    with open(p, "rb") as f:
      while chunk := f.read(1 << 24):
        value = zlib.crc32(chunk, value)
  rates["crc32 (zlib)"] = total / (time.perf_counter() - start) / 1e9
  return rates


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="t5_base")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
  parser.add_argument("--out", default=None, help="also write the result as JSON here")
  args = parser.parse_args(argv)
  state = random_state(args.model)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  root = Path(args.dir or tempfile.mkdtemp(prefix="bench_integrity-"))
  times = {True: [], False: []}
  try:
    for _ in range(args.repeats):
      for manifests in (False, True):
        times[manifests].append(save_and_restore(state, root, manifests))
    step_dir = root / "with" / "checkpoints" / "1"
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    rates = hash_rates(step_dir)
    # The manifest's own work, alone: what the save and the restore add.
    hashing = {"write_manifest": [], "verify": []}
    for _ in range(args.repeats):
      start = time.perf_counter()
      integrity.write_manifest(step_dir)
      hashing["write_manifest"].append(time.perf_counter() - start)
      start = time.perf_counter()
      assert integrity.verify(step_dir) is None
      hashing["verify"].append(time.perf_counter() - start)
  finally:
    _with_manifests(True)
    if args.dir is None:
      shutil.rmtree(root, ignore_errors=True)
  best = {m: (min(t[0] for t in times[m]), min(t[1] for t in times[m])) for m in times}
  result = {
      "model": args.model, "state_gb": state_bytes / 1e9, "files": len(files),
      "save_s": {"without": best[False][0], "with": best[True][0]},
      "restore_s": {"without": best[False][1], "with": best[True][1]},
      "manifest_s": {k: min(v) for k, v in hashing.items()},
      "hash_gb_per_s": rates, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
  }
  print(f"{args.model}: {state_bytes / 1e9:.2f} GB of state, {len(files)} files in the step")
  print("| | without manifest | with manifest | overhead |")
  print("|---|---|---|---|")
  for what in ("save", "restore"):
    without, with_ = result[f"{what}_s"]["without"], result[f"{what}_s"]["with"]
    print(f"| {what} (s) | {without:.2f} | {with_:.2f} | {with_ - without:+.2f} s "
          f"({(with_ / without - 1) * 100:+.0f}%) |")
  print(f"the manifest alone ({integrity._THREADS} threads): written in "  # pylint: disable=protected-access
        f"{result['manifest_s']['write_manifest']:.2f} s, verified in "
        f"{result['manifest_s']['verify']:.2f} s")
  print("hash rates, GB/s on one thread:",
        ", ".join(f"{k} {v:.2f}" for k, v in rates.items()))
  print(f"load average {result['load_average']}")
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  return result


if __name__ == "__main__":
  main()
