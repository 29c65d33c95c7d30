"""Command lines that launch training: here on an emulated CPU mesh, or on
every worker of a Cloud TPU slice through `gcloud compute tpus tpu-vm`
(`switch-jax launch`, whose flags are in cli/commands/launch.py).

    switch-jax launch local --dry_run --gin_file=... --model_dir=/tmp/run
    switch-jax launch tpu --dry_run --name=my-tpu --zone=... --project=... \\
      --accelerator_type=v4-32 --package=dist/switch_jax-0.1.0-py3-none-any.whl \\
      --gin_file=... --model_dir=gs://bucket/run --tfds_data_dir=gs://bucket/tfds

Every builder returns an argv list, and the launcher runs argv lists without
a local shell. A shell does run on each TPU worker: `gcloud ... ssh
--command=STRING` hands STRING to the worker's login shell. That string is
built with shlex.join from an argv list, so every user value in it is quoted
once, for that shell; locally it stays one argv element. The dry run prints
commands with shlex.join, which quotes the --command element a second time,
so what it prints is what runs when pasted into a shell.

Gin string values (MODEL_DIR) become double-quoted gin literals built by
json.dumps, so a quote in a path cannot end the gin string either. The other
`--gin NAME=VALUE` bindings are gin text, passed as typed, like the trainer's
own `--gin.NAME=VALUE` flags: gin is code, so they must come from the user.

A TPU VM's own `python3` is too old for the package (3.10 on
tpu-ubuntu2204-base), so each worker gets a virtualenv, WORKER_VENV in its
home folder, made by uv (installed with the system pip): uv uses a Python
>= 3.11 that the worker has, else installs one. The package goes in with
its `tpu` extra (the jax[tpu] version it pins), and training runs with the
venv's Python.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from typing import Callable, Mapping, Optional, Sequence, Union

from switch_jax.cli import train_failure
from switch_jax.errors import UserError

TPU_VM = ("gcloud", "compute", "tpus", "tpu-vm")
# The workers' Python, as uv's --python takes it: a version range, a version
# (3.12) or an interpreter. The range is the package's python_requires.
DEFAULT_PYTHON = ">=3.11,<3.14"
SYSTEM_PYTHON = "python3"  # on the workers, where it only installs uv
# Relative to the home folder, where `gcloud ... ssh --command` starts.
WORKER_VENV = "switch-jax-venv"
DISTRIBUTION = "switch-jax"
DEFAULT_RUNTIME_VERSION = "tpu-ubuntu2204-base"
DEFAULT_NUM_DEVICES = 8
LOCAL_PROGRAM = ("switch-jax",)
# glibc (>= 2.35) backs the large blocks malloc maps with transparent huge
# pages when this tunable is set; it is read at process start, so only a
# child process gets it. XLA:CPU takes fresh memory for its outputs and
# temporaries on every step, and on 4 KiB pages the first write to it ran at
# 2.5 GB/s on a 2-core cloud VM (8.5 GB/s with huge pages): a Base-shaped
# Switch train step ran 6% faster, the dense one 10% (docs/performance.md).
# Ignored elsewhere (musl, macOS).
HUGE_PAGES = "glibc.malloc.hugetlb=1"

# GCP resource names; the zone, project and TPU type shapes are looser than
# GCP's own checks on purpose: they only keep typos and stray syntax out.
_NAME_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_ZONE_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT_RE = re.compile(r"([a-z][-a-z0-9.]*[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")
_ACCELERATOR_RE = re.compile(r"v[0-9]+[a-z]*-[0-9]+")
_RUNTIME_RE = re.compile(r"[a-z0-9][-a-z0-9._]*")
_BUCKET_RE = re.compile(r"[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]")
_GIN_NAME_RE = re.compile(r"[A-Za-z_][\w.]*(/[A-Za-z_][\w.]*)*")
_PYTHON_RE = re.compile(r"[\w./+<>=!~][\w./+<>=!~*,-]*")
_DIST_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\.(whl|tar\.gz|zip)")
_VERSION_CLAUSE = r"(~=|==|!=|<=|>=|<|>|===)[A-Za-z0-9.*+!_-]+"
_REQUIREMENT_RE = re.compile(
    rf"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?({_VERSION_CLAUSE}(,{_VERSION_CLAUSE})*)?")
_GIT_URL_RE = re.compile(r"git\+(https|ssh)://[^\s]+")

GinValue = Union[str, bool, int, float, None]


# ---------------------------------------------------------------- validation


def _check_text(value, what: str) -> str:
  if not isinstance(value, str) or not value:
    raise UserError(f"{what} must be a non-empty string, got {value!r}")
  # Control characters and line separators: a value stays on one line everywhere.
  if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
    raise UserError(f"{what} {value!r} contains a control character (a newline?)")
  return value


def _check(pattern: re.Pattern, value, what: str, rule: str) -> str:
  _check_text(value, what)
  if not pattern.fullmatch(value):
    raise UserError(f"{what} {value!r} is not valid: {rule}")
  return value


def check_tpu_name(name: str) -> str:
  _check(_NAME_RE, name, "TPU name",
         "use lowercase letters, digits and '-', starting with a letter and not ending "
         "with '-' (GCP's [a-z]([-a-z0-9]*[a-z0-9])?)")
  if len(name) > 63:
    raise UserError(f"TPU name {name!r} is longer than 63 characters")
  return name


def _check_slice(name: str, zone: str, project: str) -> None:
  check_tpu_name(name)
  _check(_ZONE_RE, zone, "zone", "expected a zone such as us-central2-b")
  _check(_PROJECT_RE, project, "project",
         "expected a project ID: 6-30 lowercase letters, digits or '-', starting with a letter")


def check_gcs_path(path: str, what: str) -> str:
  """`path` if it is gs://BUCKET[/OBJECT...], else a UserError."""
  _check_text(path, what)
  if not path.startswith("gs://"):
    raise UserError(f"{what} {path!r} must be on Cloud Storage (gs://BUCKET/...): every "
                    "worker of a pod reads and writes it, and a local path would differ "
                    "on each worker")
  bucket = path[len("gs://"):].split("/", 1)[0]
  if not _BUCKET_RE.fullmatch(bucket):
    raise UserError(f"{what} {path!r}: {bucket!r} is not a bucket name (3-222 lowercase "
                    "letters, digits, '-', '_' or '.', starting and ending with a letter "
                    "or digit)")
  return path


def check_shared_path(path: str, what: str) -> str:
  """`path` if it is gs://BUCKET/... or an absolute path (one that every
  worker mounts at the same place: Filestore, NFS, a gcsfuse mount of a
  bucket), else a UserError."""
  _check_text(path, what)
  if path.startswith("gs://"):
    return check_gcs_path(path, what)
  if not path.startswith("/"):
    raise UserError(f"{what} {path!r} must be an absolute path on the file system every "
                    "worker mounts (or gs://BUCKET/...): a relative one would be each "
                    "worker's own")
  return path


def gin_string(value: str) -> str:
  """A double-quoted gin string literal that gin parses back to `value`."""
  return json.dumps(_check_text(value, "gin string"), ensure_ascii=False)


def _gin_text(name: str, value: GinValue) -> str:
  _check(_GIN_NAME_RE, name, "gin binding name",
         "expected NAME, Configurable.param or scope/Configurable.param")
  if value is None or isinstance(value, (bool, int, float)):
    return repr(value)
  if isinstance(value, str):
    return _check_text(value, f"gin binding {name}")
  raise UserError(f"gin binding {name}: pass gin text as a string, got {type(value).__name__}")


def _check_gin_file(path: str) -> str:
  _check_text(path, "gin file")
  if path.startswith("-"):
    raise UserError(f"gin file {path!r} looks like a flag")
  return path


def _check_extra_flag(flag: str) -> str:
  _check_text(flag, "extra trainer flag")
  if not flag.startswith("--"):
    raise UserError(f"extra trainer flag {flag!r} must start with '--' (use the --flag=value "
                    "form)")
  return flag


# ------------------------------------------------------------ trainer command


def trainer_args(gin_files: Sequence[str], gin_bindings: Mapping[str, GinValue] = None, *,
                 model_dir: Optional[str] = None, tfds_data_dir: Optional[str] = None,
                 extra_flags: Sequence[str] = ()) -> list[str]:
  """The flags of `switch-jax train` after the subcommand, in a fixed order:
  gin files, MODEL_DIR, the other bindings, the data dir, the extra flags."""
  gin_bindings = dict(gin_bindings or {})
  if not gin_files:
    raise UserError("no gin files: pass at least a model and a run file, e.g. "
                    "models/switch_base_8.gin runs/pretrain.gin")
  args = [f"--gin_file={_check_gin_file(f)}" for f in gin_files]
  if model_dir is not None:
    if "MODEL_DIR" in gin_bindings:
      raise UserError("MODEL_DIR is given twice: as the model dir and as a gin binding")
    args.append(f"--gin.MODEL_DIR={gin_string(model_dir)}")
  args += [f"--gin.{name}={_gin_text(name, value)}" for name, value in gin_bindings.items()]
  if tfds_data_dir is not None:
    args.append(f"--tfds_data_dir={_check_text(tfds_data_dir, 'TFDS data dir')}")
  args += [_check_extra_flag(f) for f in extra_flags]
  return args


def local_train_command(num_devices: int, gin_files: Sequence[str],
                        gin_bindings: Mapping[str, GinValue] = None, *,
                        model_dir: Optional[str] = None, tfds_data_dir: Optional[str] = None,
                        extra_flags: Sequence[str] = ()) -> list[str]:
  """`switch-jax train` on this machine's CPU, emulating `num_devices` devices."""
  return [*LOCAL_PROGRAM, "train", f"--num_cpu_devices={_check_num_devices(num_devices)}",
          *trainer_args(gin_files, gin_bindings, model_dir=model_dir,
                        tfds_data_dir=tfds_data_dir, extra_flags=extra_flags)]


def local_quickstart_command(num_devices: int = DEFAULT_NUM_DEVICES,
                             output_dir: Optional[str] = None,
                             gin_bindings: Mapping[str, GinValue] = None) -> list[str]:
  """`switch-jax quickstart` (a Switch model and its dense baseline, on the CPU)."""
  command = [*LOCAL_PROGRAM, "quickstart", f"--num_cpu_devices={_check_num_devices(num_devices)}"]
  if output_dir is not None:
    command.append(f"--output_dir={_check_text(output_dir, 'output dir')}")
  command += [f"--gin.{k}={_gin_text(k, v)}" for k, v in (gin_bindings or {}).items()]
  return command


def huge_page_env(env: Mapping[str, str]) -> dict[str, str]:
  """`env` with HUGE_PAGES added to GLIBC_TUNABLES, unless it sets
  glibc.malloc.hugetlb already (to 0, say, to turn it off)."""
  env = dict(env)
  tunables = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" not in tunables:
    env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGE_PAGES) if t)
  return env


def _check_num_devices(num_devices) -> int:
  if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
    raise UserError(f"the number of devices must be a positive integer, got {num_devices!r}")
  return num_devices


# ------------------------------------------------------------- TPU commands


def _tpu(verb: str, name: str, zone: str, project: str) -> list[str]:
  _check_slice(name, zone, project)
  return [*TPU_VM, verb, name, f"--zone={zone}", f"--project={project}"]


def tpu_create_command(name: str, zone: str, project: str, accelerator_type: str,
                       runtime_version: str = DEFAULT_RUNTIME_VERSION, *, spot: bool = False,
                       preemptible: bool = False) -> list[str]:
  """Creates the slice: `gcloud compute tpus tpu-vm create`."""
  _check(_ACCELERATOR_RE, accelerator_type, "accelerator type",
         "expected VERSION-SIZE such as v4-32, v5p-64 or v5litepod-16")
  _check(_RUNTIME_RE, runtime_version, "runtime version",
         "expected a TPU software version such as tpu-ubuntu2204-base")
  if spot and preemptible:
    raise UserError("choose one of spot and preemptible (spot is the newer kind)")
  command = _tpu("create", name, zone, project) + [
      f"--accelerator-type={accelerator_type}", f"--version={runtime_version}"]
  if spot:
    command.append("--spot")
  if preemptible:
    command.append("--preemptible")
  return command


def tpu_describe_command(name: str, zone: str, project: str) -> list[str]:
  """Prints the slice's state (READY, CREATING, PREEMPTED, ...); fails if it
  does not exist. The launcher reuses a READY slice instead of creating one."""
  return _tpu("describe", name, zone, project) + ["--format=value(state)"]


def tpu_delete_command(name: str, zone: str, project: str) -> list[str]:
  return _tpu("delete", name, zone, project) + ["--quiet"]


def tpu_ssh_command(name: str, zone: str, project: str,
                    remote_commands: Sequence[Sequence[str]]) -> list[str]:
  """Runs argv lists one after another (`&&`) on every worker of the slice."""
  remote = " && ".join(shlex.join(argv) for argv in remote_commands)
  return _tpu("ssh", name, zone, project) + ["--worker=all", f"--command={remote}"]


def tpu_upload_command(name: str, zone: str, project: str, local_path: str) -> list[str]:
  """Copies a local file to the home folder of every worker."""
  _check_slice(name, zone, project)
  return [*TPU_VM, "scp", local_path, f"{name}:", "--worker=all", f"--zone={zone}",
          f"--project={project}"]


def package_kind(source: str) -> str:
  """'git', 'file' (a local wheel or sdist, uploaded first) or 'pypi'."""
  _check_text(source, "package")
  if source.startswith("git+"):
    if not _GIT_URL_RE.fullmatch(source):
      raise UserError(f"package {source!r}: expected git+https://HOST/REPO[@REF] or "
                      "git+ssh://...")
    return "git"
  if source.endswith((".whl", ".tar.gz", ".zip")) or "/" in source or os.sep in source:
    if not os.path.isfile(source):
      raise UserError(f"package {source!r}: no such file (build a wheel of this checkout "
                      "with `pip wheel --no-deps -w dist .`)")
    if not _DIST_FILE_RE.fullmatch(os.path.basename(source)):
      raise UserError(f"package {source!r}: expected a .whl, .tar.gz or .zip file whose "
                      "name has only letters, digits and ._+-")
    return "file"
  if not _REQUIREMENT_RE.fullmatch(source):
    raise UserError(f"package {source!r}: expected a requirement such as switch-jax==0.1.0, "
                    "a git+https:// URL or the path of a wheel or sdist")
  return "pypi"


def with_tpu_extra(source: str) -> str:
  """The requirement that installs `source` with its `tpu` extra: a local
  file as ./NAME[tpu], a git URL as switch-jax[tpu] @ URL, and a requirement
  with `tpu` added to its extras."""
  kind = package_kind(source)
  if kind == "file":
    return f"./{os.path.basename(source)}[tpu]"
  if kind == "git":
    return f"{DISTRIBUTION}[tpu] @ {source}"
  name, extras, specifiers = re.fullmatch(
      r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([A-Za-z0-9._,-]*)\])?(.*)", source).groups()
  extras = [e for e in (extras or "").split(",") if e]
  if "tpu" not in extras:
    extras.append("tpu")
  return f"{name}[{','.join(extras)}]{specifiers}"


def worker_python(venv: str = WORKER_VENV) -> str:
  """The interpreter of the workers' virtualenv, which runs training."""
  return f"{venv}/bin/python"


def tpu_install_commands(name: str, zone: str, project: str, source: str, *,
                         python: str = DEFAULT_PYTHON) -> list[list[str]]:
  """Sets up every worker from nothing: uv, a virtualenv with a Python that
  the package supports, and the package with JAX for TPUs in it.

  `source` is a pip requirement, a git+https:// URL, or a local wheel or
  sdist, which is first copied to every worker (so two commands). On the
  worker, in its home folder:

  1. the system Python's pip installs uv for the user (~/.local), unless it
     is there; tpu-ubuntu2204-base's python3 (3.10) does that well enough;
  2. `uv venv --allow-existing` makes WORKER_VENV, or keeps it on a re-run,
     with a Python matching `python`: one the worker has (python3.11 ...
     python3.13 on PATH, or one uv installed before), else a build that uv
     downloads and installs;
  3. `uv pip install` puts the package in with its `tpu` extra, so jax[tpu]
     is the version the package pins; --reinstall-package replaces an
     installed copy of the same version (a rebuilt wheel).
  """
  _check(_PYTHON_RE, python, "remote python",
         "expected a version (3.12), a range (>=3.11,<3.14) or an interpreter name or path")
  commands = []
  if package_kind(source) == "file":
    commands.append(tpu_upload_command(name, zone, project, source))
  uv = [SYSTEM_PYTHON, "-m", "uv"]
  commands.append(tpu_ssh_command(name, zone, project, [
      [SYSTEM_PYTHON, "-m", "pip", "install", "--user", "uv"],
      [*uv, "venv", "--allow-existing", f"--python={python}", WORKER_VENV],
      [*uv, "pip", "install", f"--python={worker_python()}", "--reinstall-package",
       DISTRIBUTION, with_tpu_extra(source)]]))
  return commands


def tpu_train_command(name: str, zone: str, project: str, gin_files: Sequence[str],
                      gin_bindings: Mapping[str, GinValue], model_dir: str,
                      tfds_data_dir: Optional[str] = None,
                      extra_flags: Sequence[str] = (), *,
                      shared_filesystem: bool = False) -> list[str]:
  """`switch-jax train --distributed` on every worker: the same command on
  each host, where jax.distributed.initialize() finds the others itself.
  It runs with the Python of the virtualenv that tpu_install_commands made.
  The model and data dirs are gs:// paths, or with `shared_filesystem`
  absolute paths of a file system mounted on every worker.

  `python -m switch_jax.cli.main` rather than the `switch-jax` script: it
  names the interpreter, so nothing depends on the ssh session's PATH.
  """
  check_path = check_shared_path if shared_filesystem else check_gcs_path
  check_path(model_dir, "model dir")
  if tfds_data_dir is not None:
    check_path(tfds_data_dir, "TFDS data dir")
  train = [worker_python(), "-m", "switch_jax.cli.main", "train", "--distributed",
           *trainer_args(gin_files, gin_bindings, model_dir=model_dir,
                         tfds_data_dir=tfds_data_dir, extra_flags=extra_flags)]
  return tpu_ssh_command(name, zone, project, [train])


# ------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of a launch. `role` says how the launcher treats it:
  'describe' decides whether the following 'create' runs."""
  role: str
  argv: list[str]
  comment: Optional[str] = None
  model_dir: Optional[str] = None  # of a 'train' step: where a re-run resumes from

  @property
  def remote_command(self) -> Optional[str]:
    """What an ssh step runs on each worker, quoted once."""
    flags = [a for a in self.argv if a.startswith("--command=")]
    return flags[0][len("--command="):] if flags else None


def tpu_plan(*, name: str, zone: str, project: str, accelerator_type: str,
             runtime_version: str = DEFAULT_RUNTIME_VERSION, spot: bool = False,
             preemptible: bool = False, package: Optional[str] = None,
             gin_files: Sequence[str], gin_bindings: Mapping[str, GinValue] = None,
             model_dir: str, tfds_data_dir: Optional[str] = None,
             extra_flags: Sequence[str] = (), python: str = DEFAULT_PYTHON,
             install: bool = True, delete: bool = False,
             shared_filesystem: bool = False) -> list[Step]:
  """Create or reuse the slice, install the package, train, maybe delete."""
  steps = [
      Step("describe", tpu_describe_command(name, zone, project),
           f"Reuse TPU slice {name} if it exists and is READY; create it if describe fails:"),
      Step("create", tpu_create_command(name, zone, project, accelerator_type,
                                        runtime_version, spot=spot, preemptible=preemptible))]
  if install:
    if package is None:
      raise UserError("no package to install: pass a wheel, an sdist, a git+https:// URL or "
                      "a requirement (or skip the install when the workers have it)")
    install_commands = tpu_install_commands(name, zone, project, package, python=python)
    comment = (f"Set up every worker: uv, a virtualenv ~/{WORKER_VENV} with Python {python}, "
               "the package and jax[tpu] in it:")
    steps += [Step("install", argv, comment if i == 0 else None)
              for i, argv in enumerate(install_commands)]
  steps.append(Step("train", tpu_train_command(
      name, zone, project, gin_files, gin_bindings or {}, model_dir, tfds_data_dir,
      extra_flags, shared_filesystem=shared_filesystem),
      "Train on every worker (re-running resumes from the newest checkpoint in the model dir):",
      model_dir=model_dir))
  if delete:
    steps.append(Step("delete", tpu_delete_command(name, zone, project),
                      "Delete the slice (after training, whether or not it succeeded):"))
  return steps


def format_plan(steps: Sequence[Step]) -> str:
  """The dry run: each command on its own line, shell-quoted, under comments."""
  lines = []
  for step in steps:
    if step.comment:
      lines.append(f"# {step.comment}")
    if step.remote_command:  # readable: one level of quoting less
      lines.append(f"#   on every worker: {step.remote_command}")
    lines.append(shlex.join(step.argv))
  return "\n".join(lines) + "\n"


Runner = Callable[..., subprocess.CompletedProcess]


def run_plan(steps: Sequence[Step], runner: Runner = subprocess.run) -> int:
  """Runs the steps as argv lists (never through a local shell); the exit
  status of the first command that fails, else 0. A 'delete' step runs even
  after a failure once the slice exists."""
  status, slice_exists = 0, False
  skip_create = False
  for step in steps:
    if step.role == "delete":
      if slice_exists:
        delete_status = _run(step.argv, runner)
        status = status or delete_status
      continue
    if status:
      continue
    if step.role == "describe":
      found = runner(step.argv, capture_output=True, text=True, check=False)
      if found.returncode == 0:
        _check_reusable(found.stdout.strip(), step.argv)
        print(f"+ reusing the READY slice {step.argv[len(TPU_VM) + 1]}", file=sys.stderr)
        skip_create = slice_exists = True
      continue
    if step.role == "create" and skip_create:
      continue
    if step.role == "train":
      status = _run_train(step, runner)
      continue
    status = _run(step.argv, runner)
    slice_exists = slice_exists or (step.role == "create" and status == 0)
  return status


def _run(argv: list[str], runner: Runner) -> int:
  print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
  return runner(argv, check=False).returncode


def _run_train(step: Step, runner: Runner) -> int:
  """Runs the training step; when it fails, says which process was lost or
  failed and the step a re-run resumes from (cli/train_failure.py)."""
  print(f"+ {shlex.join(step.argv)}", file=sys.stderr, flush=True)
  if runner is subprocess.run:  # the real thing: pass the output through and keep its end
    status, lines = train_failure.stream(step.argv)
  else:
    status, lines = runner(step.argv, check=False).returncode, []
  if status:
    print(train_failure.report(
        name=step.argv[len(TPU_VM) + 1], status=status, lines=lines,
        step=train_failure.newest_step(step.model_dir) if step.model_dir else None),
          file=sys.stderr, flush=True)
  return status


def _check_reusable(state: str, describe_argv: list[str]) -> None:
  if state == "READY":
    return
  # describe_argv is TPU_VM + ["describe", name, --zone, --project, --format].
  name_zone_project = describe_argv[len(TPU_VM) + 1:len(TPU_VM) + 4]
  delete = shlex.join([*TPU_VM, "delete", *name_zone_project])
  raise UserError(f"TPU slice {name_zone_project[0]} exists in state {state or 'unknown'}, not "
                  f"READY. Wait if it is CREATING; if it was PREEMPTED or is broken, delete "
                  f"it and run again: {delete}")


if __name__ == "__main__":
  # The old spelling, `python -m switch_jax.cli.launch local|tpu ...`, keeps
  # working as `switch-jax launch local|tpu ...`.
  from switch_jax.cli import main as cli  # pylint: disable=import-outside-toplevel
  sys.exit(cli.main(["launch", *sys.argv[1:]]))
