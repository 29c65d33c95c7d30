"""The `switch-jax` command line: one console script, one subcommand per job.

Each subcommand lives in its own module, which exposes
`add_arguments(parser)` and `run(args) -> int`; modules are imported only
when their subcommand runs, so `switch-jax --help` starts fast and the model
commands never import TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util  # `import importlib` alone does not load the submodule
import os
import sys

from switch_jax.cli import host_watchdog
from switch_jax.errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("switch_jax.cli.commands.train", "pretrain or fine-tune a model from gin files"),
    "eval": ("switch_jax.cli.commands.evaluate", "evaluate a checkpoint on a task"),
    "infer": ("switch_jax.cli.commands.infer", "decode a task's inputs or a text file"),
    "score": ("switch_jax.cli.commands.score", "sum target log-likelihoods of JSONL examples"),
    "convert": ("switch_jax.cli.commands.convert",
                "convert Hugging Face checkpoints to and from ours"),
    "plan": ("switch_jax.cli.commands.plan",
             "memory, communication and FLOPs of a config on a mesh"),
    "launch": ("switch_jax.cli.commands.launch",
               "print or run the commands that train here or on a Cloud TPU slice"),
    "tasks": ("switch_jax.cli.commands.tasks", "list registered seqio tasks and mixtures"),
    "vocab": ("switch_jax.cli.commands.vocab", "train a SentencePiece vocabulary on local text"),
    "plot": ("switch_jax.cli.commands.plot", "plot a run's loss curve and expert load"),
    "quickstart": ("switch_jax.cli.commands.quickstart",
                   "pretrain a small Switch model and its dense baseline on the embedded corpus"),
}


def _available():
  """Subcommands whose module exists in this installation."""
  found = {}
  for name, (module, help_text) in SUBCOMMANDS.items():
    if importlib.util.find_spec(module) is not None:
      found[name] = (module, help_text)
  return found


def build_parser(commands=None) -> argparse.ArgumentParser:
  commands = _available() if commands is None else commands
  parser = argparse.ArgumentParser(
      prog="switch-jax",
      description="Switch Transformers (sparse mixture-of-experts T5) in JAX.")
  sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(commands) + "}")
  sub.required = True
  for name, (module, help_text) in commands.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(_module=module)
  return parser


def _keep_writes_in_the_cache() -> None:
  """TensorFlow (Keras) and matplotlib write config files under $HOME on
  import; point them at switch-jax's own cache so a run writes only there
  and in its model dir."""
  cache = os.environ.get("SWITCH_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "switch_jax")
  os.environ.setdefault("KERAS_HOME", os.path.join(cache, "keras"))
  os.environ.setdefault("MPLCONFIGDIR", os.path.join(cache, "matplotlib"))


def _without_gin_note(error: Exception) -> str:
  """The error's message without the line gin appends to errors raised inside
  a configurable ("  In call to configurable 'train' (<function ...>)")."""
  return str(error).split("\n  In call to configurable", 1)[0]


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  _keep_writes_in_the_cache()
  commands = _available()
  parser = build_parser(commands)
  # Parse the subcommand name first, then let its module add its own flags.
  if argv and argv[0] in commands:
    module = importlib.import_module(commands[argv[0]][0])
    sub_parser = argparse.ArgumentParser(
        prog=f"switch-jax {argv[0]}", description=commands[argv[0]][1])
    module.add_arguments(sub_parser)
    from switch_jax.cli.commands import gin_flags  # pylint: disable=import-outside-toplevel
    try:
      # t5x-style `--gin.NAME=VALUE` and `--gin_bindings=...` become gin bindings.
      rest, bindings = gin_flags.split_gin_flags(argv[1:])
      args = sub_parser.parse_args(rest)
      args.gin_bindings = bindings
      return int(module.run(args) or 0)
    except UserError as e:
      print(f"switch-jax {argv[0]}: error: {_without_gin_note(e)}", file=sys.stderr)
      return 2
    except Exception as e:  # a lost host's collective error: the watch speaks instead
      host_watchdog.await_lost_host(e)
      raise
  parser.parse_args(argv)  # prints help or the error for an unknown command
  return 2


if __name__ == "__main__":
  sys.exit(main())
