"""`switch-jax launch local|tpu|gke`: print (--dry_run) or run the commands
that launch training, here on an emulated CPU mesh, on every worker of a
Cloud TPU slice, or as a Kubernetes Job on a GKE TPU slice node pool. The
commands themselves are built in `switch_jax.cli.launch` (the Kubernetes
manifests in `switch_jax.cli.gke`); launch/local.sh and launch/tpu_pod.sh
call this subcommand.

  switch-jax launch local --dry_run --gin_file=runs/pretrain.gin --model_dir=/tmp/run
  switch-jax launch tpu --dry_run --name=my-tpu --zone=us-central2-b --project=my-project \\
      --accelerator_type=v4-32 --package=dist/switch_jax-0.1.0-py3-none-any.whl \\
      --gin_file=runs/pretrain.gin --model_dir=gs://bucket/run
  switch-jax launch gke --dry_run --name=switch-base-8 --accelerator_type=v5litepod-16 \\
      --image=IMAGE --gin_file=runs/pretrain.gin --model_dir=gs://bucket/run
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from typing import Sequence

from switch_jax.cli import gke as gke_manifests
from switch_jax.cli import launch
from switch_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="target", required=True)

  def common(p):
    p.add_argument("--gin_file", action="append", default=[], help="repeatable, in order")
    p.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE",
                   help="a gin binding, as gin text (strings need double quotes)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")

  local = sub.add_parser("local", help="train on this machine's CPU over an emulated mesh")
  common(local)
  local.add_argument("--num_devices", type=int, default=launch.DEFAULT_NUM_DEVICES)
  local.add_argument("--quickstart", action="store_true",
                     help="run `switch-jax quickstart` (no gin files)")
  local.add_argument("--model_dir")
  local.add_argument("--tfds_data_dir")
  local.add_argument("--output_dir", help="the quickstart's output folder")
  local.add_argument("--train_flag", action="append", default=[], metavar="--FLAG=VALUE",
                     help="another `switch-jax train` flag, e.g. --train_flag=--gin_search_paths=x")

  tpu = sub.add_parser("tpu", help="create or reuse a TPU slice, install, train on all workers")
  common(tpu)
  tpu.add_argument("--name", required=True, help="the TPU slice's name")
  tpu.add_argument("--zone", required=True)
  tpu.add_argument("--project", required=True)
  tpu.add_argument("--accelerator_type", required=True, help="e.g. v4-32")
  tpu.add_argument("--runtime_version", default=launch.DEFAULT_RUNTIME_VERSION)
  kind = tpu.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true")
  kind.add_argument("--preemptible", action="store_true")
  tpu.add_argument("--package", help="a wheel or sdist path, a git+https:// URL or a requirement")
  tpu.add_argument("--skip_install", action="store_true", help="the workers have the package")
  tpu.add_argument("--model_dir", required=True, help="gs://BUCKET/PATH")
  tpu.add_argument("--tfds_data_dir", help="gs://BUCKET/PATH where TFDS datasets are prepared")
  tpu.add_argument("--shared_filesystem", action="store_true",
                   help="--model_dir and --tfds_data_dir may be absolute paths of a file "
                        "system every worker mounts at the same place (Filestore, NFS, gcsfuse)")
  tpu.add_argument("--python", default=launch.DEFAULT_PYTHON,
                   help="the Python of the workers' venv ~/switch-jax-venv, as uv's --python "
                        "takes it: a version (3.12), a range or an interpreter; uv uses one the "
                        "worker has, else installs one (default %(default)s)")
  tpu.add_argument("--train_flag", action="append", default=[], metavar="--FLAG=VALUE")
  tpu.add_argument("--delete", action="store_true", help="delete the slice after training")

  gke = sub.add_parser("gke", help="a Kubernetes Job for a GKE TPU slice node pool: print "
                                   "(--dry_run) or `kubectl apply` it")
  common(gke)
  gke.add_argument("--name", required=True, help="the Job's and Service's name")
  gke.add_argument("--accelerator_type", required=True, help="e.g. v4-16, v5litepod-16")
  gke.add_argument("--topology", help="the node pool's TPU topology (default: the usual one "
                                      "for the type, e.g. 2x2x2 for v4-16, 4x4 for v5litepod-16)")
  gke.add_argument("--image", required=True,
                   help="a container image with Python >= 3.11 (and the package, unless "
                        "--package installs it at start)")
  gke.add_argument("--package", help="a requirement or git+https:// URL installed in each pod "
                                     "before training (with its tpu extra)")
  gke.add_argument("--model_dir", required=True,
                   help="gs://BUCKET/PATH, or an absolute path every pod mounts (gcsfuse)")
  gke.add_argument("--tfds_data_dir")
  gke.add_argument("--spot", action="store_true", help="schedule on a Spot node pool")
  gke.add_argument("--grace_seconds", type=int, default=gke_manifests.DEFAULT_GRACE_SECONDS,
                   help="terminationGracePeriodSeconds: time to save after SIGTERM")
  gke.add_argument("--train_flag", action="append", default=[], metavar="--FLAG=VALUE")


def _bindings(pairs: Sequence[str]) -> dict[str, str]:
  bindings = {}
  for pair in pairs:
    name, sep, value = pair.partition("=")
    if not sep:
      raise UserError(f"--gin {pair!r}: expected NAME=VALUE")
    bindings[name.strip()] = value
  return bindings


def _local_command(args) -> list[str]:
  bindings = _bindings(args.gin)
  if args.quickstart:
    if args.gin_file or args.model_dir or args.tfds_data_dir or args.train_flag:
      raise UserError("--quickstart takes only --num_devices, --output_dir and --gin")
    return launch.local_quickstart_command(args.num_devices, args.output_dir, bindings)
  if args.output_dir:
    raise UserError("--output_dir is for --quickstart; pass --model_dir to train")
  return launch.local_train_command(args.num_devices, args.gin_file, bindings,
                                    model_dir=args.model_dir, tfds_data_dir=args.tfds_data_dir,
                                    extra_flags=args.train_flag)


def _tpu_plan(args) -> list[launch.Step]:
  return launch.tpu_plan(
      name=args.name, zone=args.zone, project=args.project,
      accelerator_type=args.accelerator_type, runtime_version=args.runtime_version,
      spot=args.spot, preemptible=args.preemptible, package=args.package,
      gin_files=args.gin_file, gin_bindings=_bindings(args.gin), model_dir=args.model_dir,
      tfds_data_dir=args.tfds_data_dir, extra_flags=args.train_flag, python=args.python,
      install=not args.skip_install, delete=args.delete,
      shared_filesystem=args.shared_filesystem)


def run(args) -> int:
  if getattr(args, "gin_bindings", None):
    # The one CLI takes t5x's --gin.NAME=VALUE out before parsing; here it
    # would be lost, so say which spelling launch takes.
    raise UserError("launch takes gin bindings as --gin NAME=VALUE (or --train_flag="
                    "--gin.NAME=VALUE for the trainer), not --gin.NAME=VALUE or --gin_bindings")
  if args.target == "local":
    command = _local_command(args)
    env = launch.huge_page_env(os.environ)
    shown = [f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']}", *command]
    if args.dry_run:
      print(shlex.join(shown))
      return 0
    if shutil.which(command[0]) is None:
      raise UserError(f"{command[0]} is not on PATH: install the package (pip install -e .)")
    print(f"+ {shlex.join(shown)}", file=sys.stderr, flush=True)
    return subprocess.run(command, env=env, check=False).returncode
  if args.target == "gke":
    return _gke(args)
  steps = _tpu_plan(args)
  if args.dry_run:
    sys.stdout.write(launch.format_plan(steps))
    return 0
  if shutil.which("gcloud") is None:
    raise UserError("gcloud is not on PATH: install the Google Cloud CLI, or use --dry_run")
  return launch.run_plan(steps)


def _gke(args) -> int:
  text = gke_manifests.to_yaml(gke_manifests.manifests(
      name=args.name, accelerator_type=args.accelerator_type, image=args.image,
      gin_files=args.gin_file, gin_bindings=_bindings(args.gin), model_dir=args.model_dir,
      tfds_data_dir=args.tfds_data_dir, extra_flags=args.train_flag, package=args.package,
      topology=args.topology, spot=args.spot, grace_seconds=args.grace_seconds))
  if args.dry_run:
    sys.stdout.write(text)
    return 0
  if shutil.which("kubectl") is None:
    raise UserError("kubectl is not on PATH: install it and point it at your GKE cluster "
                    "(gcloud container clusters get-credentials ...), or use --dry_run")
  print(f"+ {shlex.join(gke_manifests.KUBECTL_APPLY)}", file=sys.stderr, flush=True)
  return subprocess.run(list(gke_manifests.KUBECTL_APPLY), input=text, text=True,
                        check=False).returncode
