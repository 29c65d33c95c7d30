"""`switch-jax train`: pretrain or fine-tune from gin files.

    switch-jax train --gin_file=models/switch_base_8.gin --gin_file=runs/pretrain.gin \\
      --gin.MODEL_DIR=\\"/tmp/run\\" --gin.MIXTURE_OR_TASK_NAME=\\"c4_span_corruption\\" \\
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 512, 'targets': 114}" --gin.TRAIN_STEPS=100000

Re-running the same command resumes from the newest checkpoint in MODEL_DIR.
`--num_cpu_devices 8 --mesh_shape 2,4,1` emulates a mesh on the CPU, as in
eval, infer and plan.
"""

from __future__ import annotations

import json

import gin
from switch_jax import storage
from switch_jax.cli.commands import gin_flags


def add_arguments(parser):
  gin_flags.add_gin_arguments(parser)
  gin_flags.add_mesh_argument(parser, default_help=" (sets the gin macro MESH_SHAPE, which "
                              "the run and mesh/*.gin files bind)")


def run(args) -> int:
  if args.mesh_shape:  # after the files' bindings, so it wins over mesh/*.gin
    args.gin_bindings = [*args.gin_bindings,
                         f"MESH_SHAPE = {gin_flags.mesh_shape(args.mesh_shape)}"]
  gin_flags.setup(args)
  # JAX and the gin configurables load in gin_flags.setup, after the flags are checked.
  import jax  # pylint: disable=import-outside-toplevel
  from switch_jax.cli import gin_config  # pylint: disable=import-outside-toplevel
  train = gin.get_configurable("train")
  model_dir = storage.path(gin_config.query("train.model_dir"))
  summary = train(run_config=gin.config_str())
  if jax.process_index() == 0:
    storage.write_atomically(model_dir / "train_summary.json",
                             json.dumps(summary, indent=2, default=str))
    metrics = model_dir / ("metrics-*.jsonl" if storage.is_bucket(model_dir) else "metrics.jsonl")
    print(f"Done at step {summary['step']}. Checkpoints: {summary['checkpoint_dir']}; "
          f"metrics: {metrics}")
  return 0
