"""Resume cost: the time from start to the first batch, resuming at batch 10 and 10,000.

  python bench/bench_resume.py [--at 10,10000] [--out bench/results/resume.json]

On the embedded corpus (`embedded_span_corruption`, T5's 512/114 lengths,
8 examples per host batch, packed, shuffled), both ways in one run:
- `replay`: a65b7d8's resume, `get_dataset(cfg).skip(n).prefetch(2)`, which
  reads, tokenizes, corrupts and packs the n batches again;
- `restore`: `pipeline.get_batches(..., saved_state=...)`, the iterator
  state saved at batch n (`switch_jax.data.iterator_state`).
Each time runs from building the pipeline to the first batch in hand: the
data side of a resumed run's first step. The rest of that step (restoring
the arrays, compiling the step) does not depend on n and is not timed. The
states are made by one pass to the largest n first (not timed), which also
gives the state's size and the time `state()` takes at each save.
Measured on a machine shared with other jobs: each case runs `--rounds`
times, alternating, and keeps its fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import switch_jax.tasks  # noqa: E402,F401  pylint: disable=unused-import
from switch_jax.data import pipeline  # noqa: E402

CONFIG = pipeline.DatasetConfig("embedded_span_corruption", {"inputs": 512, "targets": 114},
                                batch_size=8, seed=0)


def _first_batch_seconds(start) -> float:
  began = time.perf_counter()
  next(start())
  return time.perf_counter() - began


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--at", default="10,10000", help="resume batches, comma-separated")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args()
  positions = sorted(int(n) for n in args.at.split(","))
  load_start, started = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M:%S")

  stream = pipeline.get_batches(CONFIG)
  states, save_seconds = {}, {}
  began = time.perf_counter()
  for position in range(1, positions[-1] + 1):
    next(stream)
    if position in positions:
      save_began = time.perf_counter()
      states[position] = stream.state()
      save_seconds[position] = time.perf_counter() - save_began
  pass_seconds = time.perf_counter() - began

  def replay(n):
    return lambda: pipeline.get_dataset(CONFIG).skip(n).prefetch(2).as_numpy_iterator()

  def restore(n):
    return lambda: pipeline.get_batches(CONFIG, start_batch=n, saved_state=states[n])

  times = {(way, n): float("inf") for way in ("replay", "restore") for n in positions}
  for _ in range(args.rounds):
    for n in positions:
      times[("restore", n)] = min(times[("restore", n)], _first_batch_seconds(restore(n)))
      times[("replay", n)] = min(times[("replay", n)], _first_batch_seconds(replay(n)))

  rows = [{"resume_at_batch": n, "replay_s": times[("replay", n)],
           "restore_s": times[("restore", n)],
           "replay_over_restore": times[("replay", n)] / times[("restore", n)],
           "state_bytes": len(states[n]), "state_seconds": save_seconds[n]} for n in positions]
  print(f"| resume at batch | replay (a65b7d8) s | restore s | replay / restore | "
        f"state MiB | state() s |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['resume_at_batch']} | {r['replay_s']:.2f} | {r['restore_s']:.2f} | "
          f"{r['replay_over_restore']:.1f} | {r['state_bytes'] / 2**20:.2f} | "
          f"{r['state_seconds']:.3f} |")
  last, first = rows[-1], rows[0]
  print(f"restore at {last['resume_at_batch']} / restore at {first['resume_at_batch']}: "
        f"{last['restore_s'] / first['restore_s']:.2f}; replay: "
        f"{last['replay_s'] / first['replay_s']:.1f}")
  results = {"meta": {"command": "python bench/bench_resume.py --at " + args.at,
                      "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "config": {**pipeline.stream_identity(CONFIG)["dataset"]},
                      "cpu": platform.machine(), "cpu_count": os.cpu_count(),
                      "rounds": args.rounds, "load_start": load_start,
                      "load_end": os.getloadavg()[0],
                      "one_pass_seconds": pass_seconds}, "resume": rows}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
