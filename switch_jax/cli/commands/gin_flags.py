"""The t5x-style flags shared by the gin-driven commands (train, eval, infer),
and the device and mesh flags they share with `plan`: one spelling each."""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
import time
from typing import Sequence

from switch_jax.cli import host_watchdog
from switch_jax.errors import UserError


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="a gin file (repeatable; later files override earlier ones); "
                           "relative paths are looked up in --gin_search_paths, the current "
                           "directory and the package's gin folder")
  parser.add_argument("--gin_search_paths", default="",
                      help="comma-separated folders to look up gin files and includes in")
  parser.add_argument("--tfds_data_dir", default=None,
                      help="where TFDS datasets are prepared (read-only; nothing downloads)")
  add_device_arguments(parser)
  add_distributed_arguments(parser)
  parser.epilog = ("Any --gin.NAME=VALUE flag becomes the gin binding `NAME = VALUE`, applied "
                   "after the files, e.g. --gin.MODEL_DIR=\\\"/tmp/run\\\" "
                   "--gin.ModelConfig.num_experts=8; t5x's --gin_bindings=\"NAME = VALUE\" "
                   "(repeatable) works too. String values need gin quotes, escaped for the "
                   "shell. Gin files are code: use trusted ones.")


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the other arguments, the gin bindings) of a command line.

  t5x's two spellings: `--gin.NAME=VALUE` becomes `NAME = VALUE`, and
  `--gin_bindings=TEXT` (or `--gin_bindings TEXT`, repeatable) is TEXT as
  it is, in the order given.
  """
  rest, bindings = [], []
  argv = list(argv)
  while argv:
    arg = argv.pop(0)
    dotted = re.fullmatch(r"--gin\.([^=]+)=(.*)", arg, flags=re.S)
    if dotted:
      bindings.append(f"{dotted.group(1)} = {dotted.group(2)}")
    elif arg.startswith("--gin_bindings="):
      bindings.append(arg.partition("=")[2])
    elif arg == "--gin_bindings":
      if not argv:
        raise UserError("--gin_bindings needs a value, e.g. --gin_bindings=\"NAME = VALUE\"")
      bindings.append(argv.pop(0))
    else:
      rest.append(arg)
  return rest, bindings


# Where --distributed's process count and index come from when no flag gives
# them (the coordinator's address has JAX's own JAX_COORDINATOR_ADDRESS).
NUM_PROCESSES_ENV = "SWITCH_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "SWITCH_JAX_PROCESS_ID"


# jax.distributed.initialize's own default.
DEFAULT_COORDINATOR_TIMEOUT = 300.0
# How long a process may go unheard before the others give it up: JAX's own
# default (100 s). A host that stalls longer than this (a long pause, a
# SIGSTOP) is taken for dead, so it is not small.
DEFAULT_HEARTBEAT_TIMEOUT = 100


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
  """--distributed, and where its processes meet when JAX cannot tell."""
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host TPU pods); on "
                           "Cloud TPU and GKE it finds the other hosts itself")
  parser.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                      help="with --distributed, on a cluster JAX does not detect: where process "
                           "0 serves the coordinator (default $JAX_COORDINATOR_ADDRESS)")
  parser.add_argument("--num_processes", type=int, default=None, metavar="N",
                      help="with --distributed: the number of processes (default "
                           f"${NUM_PROCESSES_ENV})")
  parser.add_argument("--process_id", type=int, default=None, metavar="I",
                      help=f"with --distributed: this process, 0..N-1 (default ${PROCESS_ID_ENV})")
  parser.add_argument("--coordinator_timeout", type=float, default=DEFAULT_COORDINATOR_TIMEOUT,
                      metavar="SECONDS",
                      help="with --distributed: how long to wait for the coordinator and the "
                           "other processes before failing (default %(default)s)")
  parser.add_argument("--heartbeat_timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT,
                      metavar="SECONDS",
                      help="with --distributed: a process unheard for this long is taken for "
                           "dead, and every other one stops, saying so, with exit status "
                           f"{host_watchdog.LOST_PROCESS_EXIT} instead of waiting on it; make "
                           "it longer than any stall a healthy host may have (default "
                           "%(default)s, JAX's own)")


def distributed_settings(args, environ=os.environ) -> dict:
  """The keyword arguments of jax.distributed.initialize for --distributed.

  Empty on Cloud TPU and GKE, where JAX reads the slice's metadata itself.
  Elsewhere (a CPU or GPU cluster, the simulated pod of the tests) the flags,
  or the environment on each host, name the coordinator (JAX's own
  JAX_COORDINATOR_ADDRESS), the process count and this process's index;
  JAX detects whatever is left unset where it can (SLURM, Open MPI, ...).
  """
  sources = (("coordinator_address", "JAX_COORDINATOR_ADDRESS", str),
             ("num_processes", NUM_PROCESSES_ENV, int), ("process_id", PROCESS_ID_ENV, int))
  if not getattr(args, "distributed", False):
    for key, _, _ in sources:
      if getattr(args, key, None) is not None:
        raise UserError(f"--{key} is for multi-process runs: pass --distributed too")
    return {}  # a cluster's environment variables matter only with --distributed
  settings = {}
  for key, env, kind in sources:
    value = getattr(args, key, None)
    if value is None and environ.get(env):
      try:
        value = kind(environ[env])
      except ValueError:
        raise UserError(f"${env}={environ[env]!r} is not an integer") from None
    if value is not None:
      settings[key] = value
  count, index = settings.get("num_processes"), settings.get("process_id")
  if count is not None and count < 1:
    raise UserError(f"the number of processes must be positive, got {count}")
  if index is not None and count is not None and not 0 <= index < count:
    raise UserError(f"process id {index} is not in 0..{count - 1} (the number of processes "
                    f"is {count})")
  return settings


def wait_for_coordinator(address: str, timeout: float, process_id: int) -> None:
  """Returns once something listens at `address` (HOST:PORT), else a UserError
  naming the address and the timeout.

  jax.distributed.initialize would wait as long and then abort the whole
  process from C++ (SIGABRT, a stack trace, no address), so a process that
  is not the coordinator first checks that it can reach it at all.
  """
  host, sep, port = address.rpartition(":")
  if not sep or not port.isdigit():
    raise UserError(f"--coordinator_address {address!r}: expected HOST:PORT")
  host = host.strip("[]")  # an IPv6 literal, [::1]:1234
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, timeout))):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(
            f"process {process_id} cannot reach the coordinator at {address} within "
            f"{timeout:g} s ({e.strerror or e}): start process 0 there, check the address and "
            f"that the port is open, or wait longer with --coordinator_timeout") from None
    time.sleep(0.25)


def initialize_distributed(settings: dict, timeout: int, heartbeat_timeout: int) -> None:
  """jax.distributed.initialize, and a watch that stops this process in one
  line when another one is lost (cli/host_watchdog.py)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize(**settings, initialization_timeout=timeout,
                             heartbeat_timeout_seconds=host_watchdog.jax_backstop(
                                 heartbeat_timeout))
  state = distributed.global_state
  index = state.process_id
  if state.client is None or state.num_processes < 2:
    return  # nobody else to lose

  def lost(what: str) -> None:
    host_watchdog.stop_for_lost(index, what, heartbeat_timeout, _resume_hint())
  host_watchdog.HostWatchdog(state.client, index, state.num_processes, heartbeat_timeout,
                             lost).start()


def _resume_hint() -> str:
  """Where a re-run resumes: the newest complete checkpoint, where one is known."""
  try:
    from switch_jax.checkpoints import model_format  # pylint: disable=import-outside-toplevel
    from switch_jax.cli import gin_config  # pylint: disable=import-outside-toplevel
    source = model_format.resolve(gin_config.query("train.model_dir"))
  except Exception:  # pylint: disable=broad-except  # not a training run, or no checkpoint yet
    return ("Re-run the same command on every host: it resumes from the newest complete "
            "checkpoint, if there is one.")
  return (f"Re-run the same command on every host to resume from step {source.step} "
          f"({source.path}), the newest complete checkpoint.")


def add_device_arguments(parser: argparse.ArgumentParser, default=None) -> None:
  """--num_cpu_devices (deprecated alias --emulate_devices)."""
  parser.add_argument("--num_cpu_devices", "--emulate_devices", dest="num_cpu_devices", type=int,
                      default=default, metavar="N",
                      help="emulate N devices on the CPU, a local mesh (set before JAX starts; "
                           "--emulate_devices is a deprecated alias, removed after the next "
                           "release)")


def add_mesh_argument(parser: argparse.ArgumentParser, required: bool = False,
                      default_help: str = "") -> None:
  """--mesh_shape DATA,EXPERT,MODEL (deprecated alias --mesh)."""
  parser.add_argument("--mesh_shape", "--mesh", dest="mesh_shape", required=required,
                      default=None, metavar="DATA,EXPERT,MODEL",
                      help="device mesh sizes; one may be -1 for the rest (write "
                           f"--mesh_shape=-1,8,1){default_help}; --mesh is a deprecated alias, "
                           "removed after the next release")


def mesh_shape(text: str) -> tuple[int, int, int]:
  """The --mesh_shape value as three integers."""
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != 3:
    raise UserError(f"--mesh_shape {text!r}: expected 3 entries DATA,EXPERT,MODEL (integers, "
                    "one may be -1), e.g. --mesh_shape=-1,8,1")
  return values


def setup(args) -> None:
  """Starts JAX the way the flags ask and parses the gin configuration.

  Must run before anything touches a JAX backend.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # JAX, TensorFlow and the gin configurables load only once the flags parse, and
  # after the log level above: `--help` and flag errors stay fast and quiet.
  import jax  # pylint: disable=import-outside-toplevel
  if args.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
  settings = distributed_settings(args)
  if args.distributed:
    timeout = getattr(args, "coordinator_timeout", DEFAULT_COORDINATOR_TIMEOUT)
    if timeout <= 0:
      raise UserError(f"--coordinator_timeout must be positive, got {timeout:g}")
    if settings.get("coordinator_address") and settings.get("process_id", 0) != 0:
      wait_for_coordinator(settings["coordinator_address"], timeout, settings["process_id"])
    heartbeat_timeout = getattr(args, "heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT)
    if heartbeat_timeout <= 0:
      raise UserError(f"--heartbeat_timeout must be positive, got {heartbeat_timeout}")
    initialize_distributed(settings, int(math.ceil(timeout)), heartbeat_timeout)
  from switch_jax.cli import gin_config  # pylint: disable=import-outside-toplevel
  bindings = list(getattr(args, "gin_bindings", []))
  if args.tfds_data_dir:
    bindings.append(f"tfds_data_dir.path = {args.tfds_data_dir!r}")
  search = [p for p in args.gin_search_paths.split(",") if p]
  gin_config.parse(args.gin_file, bindings, search)
