"""The t5x-style flags shared by the gin-driven commands (train, eval, infer)."""

from __future__ import annotations

import argparse
import os


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="a gin file (repeatable; later files override earlier ones); "
                           "relative paths are looked up in --gin_search_paths, the current "
                           "directory and the package's gin folder")
  parser.add_argument("--gin_search_paths", default="",
                      help="comma-separated folders to look up gin files and includes in")
  parser.add_argument("--tfds_data_dir", default=None,
                      help="where TFDS datasets are prepared (read-only; nothing downloads)")
  parser.add_argument("--num_cpu_devices", type=int, default=None,
                      help="emulate this many devices on the CPU (a local mesh)")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host TPU pods)")
  parser.epilog = ("Any --gin.NAME=VALUE flag becomes the gin binding `NAME = VALUE`, applied "
                   "after the files, e.g. --gin.MODEL_DIR=\\\"/tmp/run\\\" "
                   "--gin.ModelConfig.num_experts=8. Gin files are code: use trusted ones.")


def setup(args) -> None:
  """Starts JAX the way the flags ask and parses the gin configuration.

  Must run before anything touches a JAX backend.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax  # pylint: disable=import-outside-toplevel
  if args.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
  if args.distributed:
    jax.distributed.initialize()
  from switch_jax import gin_config  # pylint: disable=import-outside-toplevel
  bindings = list(getattr(args, "gin_bindings", []))
  if args.tfds_data_dir:
    bindings.append(f"tfds_data_dir.path = {args.tfds_data_dir!r}")
  search = [p for p in args.gin_search_paths.split(",") if p]
  gin_config.parse(args.gin_file, bindings, search)
