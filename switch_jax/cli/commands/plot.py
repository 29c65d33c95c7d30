"""`switch-jax plot MODEL_DIR [--out DIR]`: loss.png and expert_load.png from
a run's metrics.jsonl (see switch_jax/cli/plots.py); prints each file's path."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("model_dir", help="a training run's directory (holds metrics.jsonl)")
  parser.add_argument("--out", default=None, help="where to write the PNGs (default MODEL_DIR)")


def run(args: argparse.Namespace) -> int:
  # matplotlib loads only once the flags parse: `--help` stays fast.
  from switch_jax.cli import plots  # pylint: disable=import-outside-toplevel
  for path in plots.write_plots(args.model_dir, args.out):
    print(path)
  return 0
