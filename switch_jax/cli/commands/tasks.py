"""`switch-jax tasks [REGEX]`: list the registered seqio tasks and mixtures.

With `--check`, also say whether each task's data is ready on this machine
(TFDS prepared under the data directory, local files bound, embedded corpus
built); nothing is downloaded or built. `--gin.NAME=VALUE` flags apply, e.g.
`--gin.local_files.train="'/data/*.txt'"`.
"""

from __future__ import annotations

import argparse
import re

import gin

from switch_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("pattern", nargs="?", default="",
                      help="only names matching this regular expression (re.search)")
  parser.add_argument("--check", action="store_true",
                      help="say whether each task's data is ready here")
  parser.add_argument("--tfds_data_dir", default=None,
                      help="TFDS data directory for --check (default: gin, $TFDS_DATA_DIR, "
                           "~/tensorflow_datasets)")


# seqio, TensorFlow and the task registry load only in `run`'s calls, once the
# flags parse: `switch-jax tasks --help` stays fast.


def _describe_source(task) -> str:
  import seqio  # pylint: disable=import-outside-toplevel
  from switch_jax.data import sources  # pylint: disable=import-outside-toplevel

  if isinstance(task.source, seqio.TfdsDataSource):
    return f"tfds {task.source.tfds_dataset.name}"
  if isinstance(task.source, sources.TextFilesSource):
    return "text files"
  return task.source.__class__.__name__


def _data_status(task) -> str:
  import seqio  # pylint: disable=import-outside-toplevel
  from switch_jax.data import corpus, sources  # pylint: disable=import-outside-toplevel

  if isinstance(task.source, seqio.TfdsDataSource):
    missing = sources.missing_tfds_data([task])
    return f"missing: nothing at {missing[0][3]}" if missing else "ready"
  if task.name.startswith("embedded_"):
    directory = corpus.corpus_directory()
    return f"built: {directory}" if corpus.is_built(directory) else "built on first use (~30 s)"
  if task.name.startswith("local_"):
    from switch_jax.tasks import local  # pylint: disable=import-outside-toplevel
    train = local.local_files()["train"]
    return f"train files: {train}" if train else "unbound: set local_files.train in gin"
  return "?"


def _apply_gin_bindings(bindings) -> None:
  """`--gin.local_files.train='...'` and the like, so --check sees them."""
  if not bindings:
    return
  try:
    gin.parse_config(bindings)
  except (ValueError, SyntaxError) as e:
    raise UserError(f"bad gin binding: {str(e).splitlines()[0]}") from None


def run(args: argparse.Namespace) -> int:
  import seqio  # pylint: disable=import-outside-toplevel
  import switch_jax.tasks  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  from switch_jax.data import sources  # pylint: disable=import-outside-toplevel

  _apply_gin_bindings(getattr(args, "gin_bindings", []))
  try:
    pattern = re.compile(args.pattern)
  except re.error as e:
    raise UserError(f"bad regular expression {args.pattern!r}: {e}") from None
  tasks = sorted(n for n in seqio.TaskRegistry.names() if pattern.search(n))
  mixtures = sorted(n for n in seqio.MixtureRegistry.names() if pattern.search(n))
  if not tasks and not mixtures:
    raise UserError(f"no task or mixture matches {args.pattern!r}")
  matched = [seqio.TaskRegistry.get(n) for n in tasks]
  if args.check:
    sources.use_tfds_data_dir(matched, sources.explicit_tfds_data_dir(args.tfds_data_dir))
  width = max(len(n) for n in tasks + mixtures)
  for name in tasks:
    task = seqio.TaskRegistry.get(name)
    line = f"{name:<{width}}  {_describe_source(task)}"
    if args.check:
      line += f"  [{_data_status(task)}]"
    print(line)
  for name in mixtures:
    mixture = seqio.MixtureRegistry.get(name)
    print(f"{name:<{width}}  mixture of {len(mixture.tasks)} tasks")
  print(f"{len(tasks)} tasks, {len(mixtures)} mixtures")
  return 0
