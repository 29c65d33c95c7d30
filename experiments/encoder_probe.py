#!/usr/bin/env python
"""Does a trained model read its encoder input? Validation loss with each
example's real input against the same targets with another example's input.

    python experiments/encoder_probe.py runs/experiments/mini/01_scaling/dense \\
        --task embedded_prefix_lm --lengths 64,64 --pack
    python experiments/encoder_probe.py runs/experiments/mini/05_finetune/dense-d0.1 \\
        --task embedded_continuation --lengths 96,4 --batches 33

A model that reads its input loses quality when the inputs are swapped; the
difference is printed in nats per target token (experiments 01 and 05 cite it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np

ENCODER_FEATURES = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")


def swap_inputs(batch: dict) -> dict:
  """Each row gets the encoder features of the row before it (the targets stay)."""
  out = dict(batch)
  for key in ENCODER_FEATURES:
    if key in out:
      out[key] = np.roll(out[key], 1, axis=0)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="training run directories")
  parser.add_argument("--task", required=True)
  parser.add_argument("--lengths", required=True, help="inputs,targets")
  parser.add_argument("--pack", action="store_true")
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=32)
  args = parser.parse_args(argv)
  # pylint: disable-next=import-outside-toplevel
  from switch_jax.evaluation import restore, teacher_forced
  from switch_jax.checkpoints import model_format  # pylint: disable=import-outside-toplevel
  from switch_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  inputs, targets = (int(n) for n in args.lengths.split(","))
  dataset = pipeline.DatasetConfig(args.task, {"inputs": inputs, "targets": targets},
                                   split="validation", batch_size=args.batch_size,
                                   shuffle=False, pack=args.pack, num_epochs=1)
  batches = [b for _, b in zip(range(args.batches), pipeline.get_eval_batches(dataset))]
  for run_dir in args.runs:
    config = model_format.load_config(run_dir)
    model, params, mesh = restore.restore_for_eval(run_dir, config, (1, 1, 1))
    real, swapped = (teacher_forced.eval_metrics(model, params, iter(b), mesh=mesh,
                                                  batch_size=args.batch_size)["cross_entropy"]
                     for b in (batches, [swap_inputs(b) for b in batches]))
    print(f"{run_dir}: validation CE {real:.5f} with its inputs, {swapped:.5f} with another "
          f"example's ({swapped - real:+.5f})", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
