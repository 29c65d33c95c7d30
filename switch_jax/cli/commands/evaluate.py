"""`switch-jax eval`: evaluate a checkpoint on a task's eval split.

    switch-jax eval --checkpoint /runs/rte --task super_glue_rte_v102 \\
      --feature_lengths 512,8 --batch_size 32 [--decode beam] [--output_dir DIR]

or, t5x style, from gin files (the `evaluate` configurable):

    switch-jax eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH=\\"/runs/rte\\" ...

Prints the checkpoint step evaluated, teacher-forced loss and token
accuracy (named as in training's metrics.jsonl), and the task's own metrics
on decoded outputs (if it has any); a mixture's tasks one by one, then
over all of them. `--output_dir` also gets them as `eval_results.json`.
Plain flags given with gin files override the gin bindings. The model is
the checkpoint's; `--gin.ModelConfig.NAME=VALUE` replaces one field of its
config, e.g. `eval_capacity_factor` or `expert_choice_eval_capacity_factor`.
"""

from __future__ import annotations

import argparse

from switch_jax.cli.commands import gin_flags
from switch_jax.errors import UserError


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
  """The plain flags naming a checkpoint, a task and how to decode (eval, infer)."""
  from switch_jax.checkpoints import model_format  # pylint: disable=import-outside-toplevel
  parser.add_argument("--checkpoint", help=model_format.CHECKPOINT_HELP)
  parser.add_argument("--task", help="seqio task or mixture (`switch-jax tasks` lists them)")
  parser.add_argument("--split", default=None, help="split to read (default validation)")
  parser.add_argument("--feature_lengths", default=None,
                      help="INPUTS,TARGETS token lengths (default 512,114)")
  parser.add_argument("--batch_size", type=int, default=None, help="global batch size")
  parser.add_argument("--decode", choices=("greedy", "beam"), default=None,
                      help="decoding for predictions (default greedy)")
  parser.add_argument("--beam_size", type=int, default=None, help="beams (default 4)")
  parser.add_argument("--max_examples", type=int, default=None,
                      help="read at most this many examples")
  gin_flags.add_mesh_argument(parser, default_help=" (default -1,1,1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  gin_flags.add_gin_arguments(parser)
  add_dataset_arguments(parser)
  parser.add_argument("--output_dir", default=None, help="write eval_results.json here")


def _ints(text: str, count: int, flag: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != count:
    raise UserError(f"{flag} takes {count} comma-separated integers, got {text!r}")
  return values


def setup(args) -> None:
  """JAX and gin as the flags ask. Without gin files, `--gin.` bindings
  still apply (e.g. a vocabulary path); anything else takes its default."""
  if args.gin_file:
    gin_flags.setup(args)
    return
  import jax  # pylint: disable=import-outside-toplevel
  if args.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
  settings = gin_flags.distributed_settings(args)
  if args.distributed:
    jax.distributed.initialize(**settings)
  bindings = list(getattr(args, "gin_bindings", []))
  if bindings:
    import gin  # pylint: disable=import-outside-toplevel
    from switch_jax.cli import gin_config  # pylint: disable=import-outside-toplevel
    gin_config.register()
    try:
      gin.parse_config_files_and_bindings([], bindings, finalize_config=False)
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
      raise gin_config.gin_error(e, bindings) from None


def plain_kwargs(args) -> dict:
  """Keyword arguments for `evaluate` / `infer` from the plain flags given."""
  from switch_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  kwargs = {}
  if args.checkpoint:
    kwargs["checkpoint_path"] = args.checkpoint
  if args.task:
    lengths = _ints(args.feature_lengths or "512,114", 2, "--feature_lengths")
    kwargs["dataset"] = pipeline.DatasetConfig(
        args.task, {"inputs": lengths[0], "targets": lengths[1]},
        split=args.split or "validation", batch_size=args.batch_size or 32, shuffle=False,
        pack=False, tfds_data_dir=args.tfds_data_dir)
  elif args.split or args.feature_lengths:
    raise UserError("--split and --feature_lengths need --task")
  if args.batch_size is not None and args.batch_size <= 0:
    raise UserError(f"--batch_size must be positive, got {args.batch_size}")
  for name in ("decode", "beam_size", "max_examples"):
    if getattr(args, name) is not None:
      kwargs[name] = getattr(args, name)
  if args.mesh_shape:
    kwargs["mesh_shape"] = gin_flags.mesh_shape(args.mesh_shape)
  return kwargs


def configured(name: str, args, kwargs: dict):
  """The function to call: gin's configurable with the files' bindings, or
  the plain function, with the plain flags' keyword arguments."""
  from switch_jax.evaluation import evaluator, inference  # pylint: disable=import-outside-toplevel
  if args.gin_file or getattr(args, "gin_bindings", None):
    import gin  # pylint: disable=import-outside-toplevel
    # The model's config is the checkpoint's; `ModelConfig.*` bindings (say
    # an eval capacity factor) replace its fields instead of going unheard.
    overrides = gin.get_bindings("ModelConfig")
    if overrides:
      kwargs = kwargs | {"model_overrides": overrides}
  if args.gin_file:
    fn = gin.get_configurable(name)
  else:
    fn = {"evaluate": evaluator.evaluate, "infer": inference.infer}[name]
    if "checkpoint_path" not in kwargs:
      raise UserError("--checkpoint is required (or give --gin_file with "
                      "--gin.CHECKPOINT_PATH)")
  try:
    return fn(**kwargs)
  except TypeError as e:  # an argument neither gin nor a flag supplied
    if "required keyword-only argument" not in str(e):
      raise
    raise UserError(f"{name}: {str(e).splitlines()[0]}; bind it in gin or pass its flag"
                    ) from None


def run(args) -> int:
  setup(args)
  if not args.gin_file and not args.task:
    raise UserError("--task is required (or give --gin_file with an evaluate.dataset)")
  results = configured("evaluate", args, plain_kwargs(args) | (
      {"output_dir": args.output_dir} if args.output_dir else {}))
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    step = results.get("step")
    print(f"{'step':<40} {'none (a converted model)' if step is None else step}")
    for name, value in sorted(results.items()):
      if isinstance(value, float):
        print(f"{name:<40} {value:.6g}")
    if args.output_dir:
      print(f"results: {args.output_dir}/eval_results.json")
  return 0
