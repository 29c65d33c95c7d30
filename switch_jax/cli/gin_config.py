"""Gin: what users bind, and parsing the t5x-style command line.

Configurables have short names: `ModelConfig.num_experts = 8`,
`EvalConfig.period = 500`, `train/DatasetConfig.batch_size = 64`. The model,
trainer and optimizers know nothing of gin: this module registers them (data
flows one way: gin -> config -> model/trainer -> step). The data package
declares its own few bindings (`tfds_data_dir.path`, vocabulary paths,
`embedded_corpus.cache_dir`, `local_files.*`).

Gin files are Python-like code that can call any registered function: load
them only from sources you trust.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import tokenize
from typing import Sequence

import gin

from switch_jax.config import ModelConfig
from switch_jax.errors import UserError
from switch_jax.cli.resources import gin_dir
from switch_jax.training import train_config  # dataclasses only: no TensorFlow or optax

_REGISTERED = False
# Macros the run files mark %gin.REQUIRED, and what to pass for each.
REQUIRED_HINTS = {
    "MODEL_DIR": '--gin.MODEL_DIR=\\"/path/to/run\\"',
    "MIXTURE_OR_TASK_NAME": '--gin.MIXTURE_OR_TASK_NAME=\\"c4_span_corruption\\"',
    "TASK_FEATURE_LENGTHS": "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 512, 'targets': 114}\"",
    "TRAIN_STEPS": "--gin.TRAIN_STEPS=100000",
    "INITIAL_CHECKPOINT_PATH": '--gin.INITIAL_CHECKPOINT_PATH=\\"/path/to/checkpoint\\"',
    "CHECKPOINT_PATH": '--gin.CHECKPOINT_PATH=\\"/path/to/checkpoint\\"',
    "TEACHER_CHECKPOINT_PATH": '--gin.TEACHER_CHECKPOINT_PATH=\\"/path/to/teacher_run\\"',
    "INFER_OUTPUT_FILE": '--gin.INFER_OUTPUT_FILE=\\"/path/to/predictions.jsonl\\"',
}


def register() -> None:
  """Registers every configurable (once per process)."""
  global _REGISTERED
  if _REGISTERED:
    return
  # Imported here: they pull in TensorFlow (data) and optax, which the
  # model-only commands never need.
  from switch_jax.evaluation import evaluator, inference  # pylint: disable=import-outside-toplevel
  from switch_jax.training import optimizers  # pylint: disable=import-outside-toplevel
  from switch_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from switch_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  import switch_jax.tasks  # pylint: disable=import-outside-toplevel,unused-import  # its bindings

  gin.external_configurable(ModelConfig, "ModelConfig")
  gin.external_configurable(pipeline.DatasetConfig, "DatasetConfig")
  gin.external_configurable(optimizers.make_optimizer, "make_optimizer")
  gin.external_configurable(optimizers.rsqrt_schedule, "rsqrt_schedule")
  gin.external_configurable(optimizers.constant, "constant_schedule")
  gin.external_configurable(optimizers.warmup_decay, "warmup_decay_schedule")
  for config in (train_config.LoopConfig, train_config.EvalConfig,
                 train_config.CheckpointConfig, train_config.StepConfig,
                 train_config.InitConfig, train_config.DistillConfig):
    gin.external_configurable(config, config.__name__)
  gin.external_configurable(trainer.train, "train")
  gin.external_configurable(evaluator.evaluate, "evaluate")
  gin.external_configurable(inference.infer, "infer")
  gin.external_configurable(evaluator.InferenceEvaluator, "InferenceEvaluator")
  _guard_package_lookup()
  _REGISTERED = True


def _guard_package_lookup() -> None:
  """gin also looks an include such as 'runs/pretrain.gin' up as a file of
  the Python package `runs`; when the current directory has a plain folder
  of that name (the quickstart writes ./runs) the lookup finds a namespace
  package without a file and raises TypeError instead of answering "not
  here". Wrap that existence check so it answers False."""
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  for i, (reader, exists) in enumerate(readers):
    if getattr(exists, "__module__", "") == "gin.resource_reader":

      def safe_exists(path, exists=exists):
        try:
          return exists(path)
        except TypeError:
          return False

      readers[i] = (reader, safe_exists)


class _QuietMisses(logging.Filter):
  """gin logs an ERROR for every search path a file is not in; only the
  final failure matters, and that one we report."""

  def filter(self, record):
    return not record.getMessage().startswith("Path not found")


def resolve_file(name: str, search_paths: Sequence[str]) -> str:
  """The path of gin file `name`: as given, else in `search_paths`, the
  package's gin folder, or the current directory."""
  if os.path.isabs(name) or os.path.exists(name):
    return name
  for folder in [*search_paths, str(gin_dir()), os.getcwd()]:
    candidate = os.path.join(folder, name)
    if os.path.exists(candidate):
      return candidate
  raise UserError(f"gin: no file {name!r} in {', '.join([*search_paths, str(gin_dir())])} "
                  "or the current directory")


def parse(gin_files: Sequence[str], bindings: Sequence[str],
          search_paths: Sequence[str] = ()) -> None:
  """Parses files then bindings (later ones win), failing with a UserError.

  Relative `--gin_file`s and `include`s are looked up in `search_paths`,
  the package's gin folder and the current directory, in that order.
  """
  register()
  gin.clear_config()
  for path in [*search_paths, str(gin_dir()), os.getcwd()]:
    gin.add_config_file_search_path(path)
  if not gin_files:
    raise UserError("no --gin_file given; e.g. --gin_file=models/switch_base_8.gin "
                    "--gin_file=runs/pretrain.gin (`ls " + str(gin_dir()) + "` lists them)")
  files = [resolve_file(name, search_paths) for name in gin_files]
  quiet = _QuietMisses()
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
  except (ValueError, OSError, SyntaxError, KeyError, TypeError, tokenize.TokenError) as e:
    raise gin_error(e, bindings) from None
  finally:
    logging.getLogger().removeFilter(quiet)
  missing = re.findall(r"^(\w+) = %gin\.REQUIRED$", gin.config_str(), flags=re.M)
  if missing:
    fixes = " ".join(REQUIRED_HINTS.get(name, f"--gin.{name}=...") for name in missing)
    raise UserError(f"gin: {', '.join(missing)} must be set (marked %gin.REQUIRED); "
                    f"pass e.g. {fixes}")


# How a gin value may begin besides a Python literal: a reference, a macro, a
# string, a tuple, list or dict.
_GIN_VALUE_STARTS = ("@", "%", "'", '"', "(", "[", "{")


def _unquoted_string(bindings: Sequence[str]):
  """(name, value) of the first binding whose value is a bare word or path,
  such as `MODEL_DIR = /tmp/x`: a string the shell stripped the quotes of."""
  for binding in bindings:
    name, sep, value = binding.partition("=")
    value = value.strip()
    if not sep or not value or value.startswith(_GIN_VALUE_STARTS):
      continue
    try:
      ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return name.strip(), value
  return None


def gin_error(error: Exception, bindings: Sequence[str] = ()) -> UserError:
  """A parse failure as one line; a hint when a binding's string lacks quotes."""
  message = f"gin: {str(error).strip()}".replace("\n", " | ")
  moved = re.search(r"Configurable 'train' doesn't have a parameter named '(\w+)'", message)
  if moved and moved.group(1) in train_config.MOVED_TRAIN_BINDINGS:
    message += (f"; train.{moved.group(1)} is now "
                f"{train_config.MOVED_TRAIN_BINDINGS[moved.group(1)]} (see gin/runs/pretrain.gin)")
  bare = _unquoted_string(bindings)
  if bare:
    name, value = bare
    message += (f"; the binding `{name} = {value}` needs quotes around its string, escaped for "
                f'the shell: --gin.{name}=\\"{value}\\" (or --gin_bindings="{name} = '
                f"'{value}'\")")
  return UserError(message)


def query(name: str):
  """The value bound to `name` (e.g. 'train.model_dir'), macros resolved."""
  value = gin.query_parameter(name)
  if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
    return query(f"{value.scopes[0]}/macro.value")
  return value
