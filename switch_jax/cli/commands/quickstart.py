"""`switch-jax quickstart`: pretrain a small Switch model and its FLOP-matched
dense baseline on the embedded corpus over an emulated 8-device CPU mesh,
then compare them. Re-running resumes; --output_dir picks where results go.
"""

from __future__ import annotations

import os


def add_arguments(parser):
  parser.add_argument("--output_dir", default="runs/quickstart",
                      help="where both runs' checkpoints, metrics and plots go")
  parser.add_argument("--num_cpu_devices", type=int, default=8,
                      help="devices to emulate on the CPU (the mesh is 2 data x 4 expert)")
  parser.epilog = ("--gin.NAME=VALUE flags apply to both models, e.g. --gin.TRAIN_STEPS=100 "
                   "for a shorter run.")


def run(args) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # JAX and TensorFlow load only once the flags parse and the log level is set.
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
  from switch_jax.cli import quickstart  # pylint: disable=import-outside-toplevel
  quickstart.run(args.output_dir, getattr(args, "gin_bindings", []))
  return 0
