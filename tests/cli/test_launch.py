"""The launch commands: exact argv lists, quoting that keeps hostile values
inert on the remote shell, the scripts' dry runs, and input checks.

Nothing here needs gcloud: a stub `gcloud` logs its argv and runs the ssh
`--command` with bash, and stubs of the workers' `python3` and of their
virtualenv's Python log what the workers would run. The worker set-up itself
runs for real in tests/cli/test_worker_setup.py.
"""

import ast
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from switch_jax.cli import launch
from switch_jax.cli import main as cli
from switch_jax.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
SLICE = ["my-tpu", "--zone=us-central2-b", "--project=my-project"]
GIN_FILES = ["models/switch_base_8.gin", "runs/pretrain.gin", "mesh/expert_parallel.gin"]
BINDINGS = {
    "MIXTURE_OR_TASK_NAME": '"c4_span_corruption"',
    "TASK_FEATURE_LENGTHS": "{'inputs': 512, 'targets': 114}",
    "TRAIN_STEPS": 100000,
}
TRAINER_FLAGS = [
    "--gin_file=models/switch_base_8.gin", "--gin_file=runs/pretrain.gin",
    "--gin_file=mesh/expert_parallel.gin", '--gin.MODEL_DIR="gs://my-bucket/runs/switch_base_8"',
    '--gin.MIXTURE_OR_TASK_NAME="c4_span_corruption"',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 114}", "--gin.TRAIN_STEPS=100000",
    "--tfds_data_dir=gs://my-bucket/tfds"]
WHEEL = "dist/switch_jax-0.1.0-py3-none-any.whl"
VENV_PYTHON = "switch-jax-venv/bin/python"  # relative to a worker's home


def _setup_commands(requirement, python=">=3.11,<3.14"):
  """What every worker runs to set itself up, quoted once."""
  return (f"python3 -m pip install --user uv && python3 -m uv venv --allow-existing "
          f"{shlex.quote('--python=' + python)} switch-jax-venv && python3 -m uv pip install "
          f"--python=switch-jax-venv/bin/python --reinstall-package switch-jax "
          f"{shlex.quote(requirement)}")

STUB_GCLOUD = r"""#!/bin/bash
set -euo pipefail
n=$(( $(cat "$LOG_DIR/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$LOG_DIR/count"
printf '%s\0' gcloud "$@" > "$LOG_DIR/$(printf %04d "$n")"
case "$4" in
  describe)
    if [[ -n "${DESCRIBE_STATE:-}" ]]; then echo "$DESCRIBE_STATE"; exit 0; fi
    echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND" >&2; exit 1;;
  ssh)
    for arg in "$@"; do
      if [[ "$arg" == --command=* ]]; then cmd="${arg#--command=}"; fi
    done
    cd "$REMOTE_HOME"
    PATH="$REMOTE_BIN:$PATH" bash -c "$cmd";;
esac
"""
STUB_PYTHON = r"""#!/bin/bash
n=$(( $(cat "$LOG_DIR/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$LOG_DIR/count"
printf '%s\0' NAME "$@" > "$LOG_DIR/$(printf %04d "$n")"
if [[ "$*" == *switch_jax.cli.main* ]]; then exit "${TRAIN_RC:-0}"; fi
"""


def _sample_plan(**overrides):
  kwargs = dict(name="my-tpu", zone="us-central2-b", project="my-project",
                accelerator_type="v4-32", package="switch-jax==0.1.0", gin_files=GIN_FILES,
                gin_bindings=BINDINGS, model_dir="gs://my-bucket/runs/switch_base_8",
                tfds_data_dir="gs://my-bucket/tfds")
  kwargs.update(overrides)
  return launch.tpu_plan(**kwargs)


@pytest.fixture
def sandbox(tmp_path):
  """Stub gcloud (on PATH), and stubs of python3 and of the venv's Python
  that only the 'workers' see."""
  bin_dir, remote_bin, log_dir, home = (tmp_path / d for d in ("bin", "rbin", "log", "home"))
  for folder in (bin_dir, remote_bin, log_dir, home / "switch-jax-venv" / "bin"):
    folder.mkdir(parents=True)
  for path, text in ((bin_dir / "gcloud", STUB_GCLOUD),
                     (remote_bin / "python3", STUB_PYTHON.replace("NAME", "python3")),
                     (home / VENV_PYTHON, STUB_PYTHON.replace("NAME", VENV_PYTHON))):
    path.write_text(text)
    path.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG_DIR=str(log_dir),
             REMOTE_BIN=str(remote_bin), REMOTE_HOME=str(home), HOME=str(home),
             PYTHON=sys.executable, PYTHONPATH=str(REPO))
  for name in ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "BUCKET",
               "MODEL_DIR", "TFDS_DATA_DIR", "GIN_FILES", "GIN_BINDINGS", "PACKAGE",
               "REMOTE_PYTHON", "SPOT", "PREEMPTIBLE", "SKIP_INSTALL", "DELETE", "DRY_RUN",
               "NUM_DEVICES", "OUTPUT_DIR", "DESCRIBE_STATE", "TRAIN_RC", "GLIBC_TUNABLES"):
    env.pop(name, None)
  return tmp_path, env


def _calls(tmp_path):
  """The logged argv of every stub call, in order."""
  logs = sorted(p for p in (tmp_path / "log").iterdir() if p.name != "count")
  return [p.read_bytes().decode().split("\0")[:-1] for p in logs]


# ------------------------------------------------------------ exact commands


def test_tpu_commands_for_the_sample_config_are_exact():
  assert launch.tpu_describe_command("my-tpu", "us-central2-b", "my-project") == [
      *TPU, "describe", *SLICE, "--format=value(state)"]
  assert launch.tpu_create_command("my-tpu", "us-central2-b", "my-project", "v4-32",
                                   "tpu-ubuntu2204-base", spot=True) == [
      *TPU, "create", *SLICE, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
      "--spot"]
  assert launch.tpu_install_commands("my-tpu", "us-central2-b", "my-project",
                                     "switch-jax==0.1.0") == [[
      *TPU, "ssh", *SLICE, "--worker=all",
      "--command=python3 -m pip install --user uv && "
      "python3 -m uv venv --allow-existing '--python=>=3.11,<3.14' switch-jax-venv && "
      "python3 -m uv pip install --python=switch-jax-venv/bin/python "
      "--reinstall-package switch-jax 'switch-jax[tpu]==0.1.0'"]]
  assert launch.tpu_install_commands("my-tpu", "us-central2-b", "my-project",
                                     "git+https://github.com/o/switch-jax@v0.1",
                                     python="3.12")[0][-1] == "--command=" + _setup_commands(
      "switch-jax[tpu] @ git+https://github.com/o/switch-jax@v0.1", python="3.12")
  train = launch.tpu_train_command("my-tpu", "us-central2-b", "my-project", GIN_FILES, BINDINGS,
                                   "gs://my-bucket/runs/switch_base_8", "gs://my-bucket/tfds")
  assert train[:-1] == [*TPU, "ssh", *SLICE, "--worker=all"]
  assert train[-1].startswith("--command=")
  assert shlex.split(train[-1][len("--command="):]) == [
      VENV_PYTHON, "-m", "switch_jax.cli.main", "train", "--distributed", *TRAINER_FLAGS]
  assert launch.tpu_delete_command("my-tpu", "us-central2-b", "my-project") == [
      *TPU, "delete", *SLICE, "--quiet"]
  assert [s.role for s in _sample_plan(delete=True)] == [
      "describe", "create", "install", "train", "delete"]


def test_a_local_wheel_is_copied_to_every_worker_then_installed(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "dist").mkdir()
  (tmp_path / WHEEL).write_bytes(b"")
  assert launch.tpu_install_commands("my-tpu", "us-central2-b", "my-project", WHEEL) == [
      [*TPU, "scp", WHEEL, "my-tpu:", "--worker=all", "--zone=us-central2-b",
       "--project=my-project"],
      [*TPU, "ssh", *SLICE, "--worker=all",
       "--command=" + _setup_commands("./switch_jax-0.1.0-py3-none-any.whl[tpu]")]]


@pytest.mark.parametrize("source, requirement", [
    ("switch-jax", "switch-jax[tpu]"),
    ("switch-jax==0.1.0", "switch-jax[tpu]==0.1.0"),
    ("switch-jax[hf]>=0.1,<0.2", "switch-jax[hf,tpu]>=0.1,<0.2"),
    ("switch_jax[tpu]", "switch_jax[tpu]"),
    ("git+https://github.com/o/switch-jax@v0.1", "switch-jax[tpu] @ git+https://github.com/o/switch-jax@v0.1"),
])
def test_the_package_is_installed_with_its_tpu_extra(source, requirement):
  assert launch.with_tpu_extra(source) == requirement


def test_local_commands_are_exact():
  assert launch.local_train_command(4, ["models/tiny_switch.gin", "runs/pretrain.gin"],
                                    {"TRAIN_STEPS": 10}, model_dir="/tmp/my run") == [
      "switch-jax", "train", "--num_cpu_devices=4", "--gin_file=models/tiny_switch.gin",
      "--gin_file=runs/pretrain.gin", '--gin.MODEL_DIR="/tmp/my run"', "--gin.TRAIN_STEPS=10"]
  assert launch.local_quickstart_command() == ["switch-jax", "quickstart", "--num_cpu_devices=8"]
  assert launch.local_quickstart_command(8, "out", {"TRAIN_STEPS": 50}) == [
      "switch-jax", "quickstart", "--num_cpu_devices=8", "--output_dir=out",
      "--gin.TRAIN_STEPS=50"]


# ------------------------------------------------------------------ quoting

HOSTILE = {
    "model_dir": 'gs://bkt/run"; touch {p}/model_dir; echo "',
    "tfds_data_dir": "gs://bkt/$(touch {p}/tfds)/x'; touch {p}/tfds2; '",
    "MIXTURE_OR_TASK_NAME": "\"c4'; touch {p}/binding; echo '\"",
    "GIN_X": "`touch {p}/backtick` $HOME ~ * ! && touch {p}/and # \\",
    "gin_file": "models/$(touch {p}/gin_file).gin",
    "extra": "--gin_search_paths=;touch {p}/extra",
}


def _hostile(tmp_path):
  return {k: v.format(p=tmp_path / "pwned") for k, v in HOSTILE.items()}


def _hostile_train_command(values):
  return launch.tpu_train_command(
      "my-tpu", "us-central2-b", "my-project", ["runs/pretrain.gin", values["gin_file"]],
      {"MIXTURE_OR_TASK_NAME": values["MIXTURE_OR_TASK_NAME"], "GIN_X": values["GIN_X"]},
      values["model_dir"], values["tfds_data_dir"], [values["extra"]])


def _intended_trainer_argv(values):
  return ["-m", "switch_jax.cli.main", "train", "--distributed", "--gin_file=runs/pretrain.gin",
          f"--gin_file={values['gin_file']}",
          "--gin.MODEL_DIR=" + launch.gin_string(values["model_dir"]),
          f"--gin.MIXTURE_OR_TASK_NAME={values['MIXTURE_OR_TASK_NAME']}",
          f"--gin.GIN_X={values['GIN_X']}", f"--tfds_data_dir={values['tfds_data_dir']}",
          values["extra"]]


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_hostile_values_reach_the_trainer_as_inert_data(sandbox, shell):
  tmp_path, env = sandbox
  (tmp_path / "pwned").mkdir()
  values = _hostile(tmp_path)
  remote = _hostile_train_command(values)[-1][len("--command="):]
  env["PATH"] = f"{tmp_path / 'rbin'}:{env['PATH']}"
  subprocess.run([shell, "-c", remote], env=env, cwd=tmp_path / "home", check=True)
  (call,) = _calls(tmp_path)
  assert call == [VENV_PYTHON, *_intended_trainer_argv(values)]
  assert list((tmp_path / "pwned").iterdir()) == []
  # The gin literal decodes back to the exact model dir (gin parses Python literals).
  model_dir_flag = call[7]
  assert ast.literal_eval(model_dir_flag[len("--gin.MODEL_DIR="):]) == values["model_dir"]


def test_dry_run_lines_run_the_planned_commands_and_nothing_else(sandbox):
  tmp_path, env = sandbox
  (tmp_path / "pwned").mkdir()
  values = _hostile(tmp_path)
  steps = _sample_plan(model_dir=values["model_dir"], tfds_data_dir=values["tfds_data_dir"],
                       gin_bindings={"GIN_X": values["GIN_X"]}, delete=True)
  script = launch.format_plan(steps)
  subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, check=True)
  gcloud_calls = [c for c in _calls(tmp_path) if c[0] == "gcloud"]
  assert gcloud_calls == [s.argv for s in steps]
  trainer = [c for c in _calls(tmp_path) if "switch_jax.cli.main" in c][0]
  assert f"--gin.GIN_X={values['GIN_X']}" in trainer
  assert f"--tfds_data_dir={values['tfds_data_dir']}" in trainer
  assert list((tmp_path / "pwned").iterdir()) == []


# ---------------------------------------------------------- the bash scripts

POD_ENV = dict(TPU_NAME="switch-base-8", ZONE="us-central2-b", PROJECT="my-project",
               ACCELERATOR_TYPE="v4-32", BUCKET="my-bucket",
               GIN_FILES="models/switch_base_8.gin runs/pretrain.gin mesh/expert_parallel.gin",
               GIN_BINDINGS='MIXTURE_OR_TASK_NAME="c4_span_corruption"\n'
                            'TASK_FEATURE_LENGTHS={"inputs": 512, "targets": 114}\n'
                            "TRAIN_STEPS=100000\nMESH_SHAPE=(-1, 8, 1)\n",
               PACKAGE=WHEEL)
DOCS_BINDINGS = {"MIXTURE_OR_TASK_NAME": '"c4_span_corruption"',
                 "TASK_FEATURE_LENGTHS": '{"inputs": 512, "targets": 114}',
                 "TRAIN_STEPS": "100000", "MESH_SHAPE": "(-1, 8, 1)"}


def _run_script(script, env, cwd, *args):
  return subprocess.run(["bash", str(REPO / "launch" / script), *args], env=env, cwd=cwd,
                        capture_output=True, text=True, check=False)


def _docs_example_output():
  """The dry-run block that docs/pod.md shows for its example."""
  text = (REPO / "docs" / "pod.md").read_text()
  match = re.search(r"<!-- dry-run output -->\n```text\n(.*?)```", text, re.S)
  assert match, "docs/pod.md lost its dry-run block"
  return match.group(1)


def test_tpu_pod_dry_run_prints_the_docs_example(sandbox, monkeypatch):
  tmp_path, env = sandbox
  monkeypatch.chdir(tmp_path)
  (tmp_path / "dist").mkdir()
  (tmp_path / WHEEL).write_bytes(b"")
  result = _run_script("tpu_pod.sh", {**env, **POD_ENV}, tmp_path)
  assert result.returncode == 0, result.stderr
  expected = launch.format_plan(launch.tpu_plan(
      name="switch-base-8", zone="us-central2-b", project="my-project",
      accelerator_type="v4-32", package=WHEEL, gin_files=GIN_FILES, gin_bindings=DOCS_BINDINGS,
      model_dir="gs://my-bucket/runs/switch-base-8", tfds_data_dir="gs://my-bucket/tfds"))
  assert result.stdout == expected
  assert result.stdout == _docs_example_output()
  assert _calls(tmp_path) == []  # a dry run runs nothing


def test_tpu_pod_executes_the_plan_with_argv_lists(sandbox):
  tmp_path, env = sandbox
  (tmp_path / "dist").mkdir()
  (tmp_path / WHEEL).write_bytes(b"")
  env = {**env, **POD_ENV, "DRY_RUN": "0", "MODEL_DIR": 'gs://bkt/a"$(touch pwned)'}
  result = _run_script("tpu_pod.sh", env, tmp_path, "--gin", "TRAIN_STEPS=7")
  assert result.returncode == 0, result.stderr
  calls = _calls(tmp_path)
  assert [c[:5] for c in calls if c[0] == "gcloud"] == [
      [*TPU, verb] for verb in ("describe", "create", "scp", "ssh", "ssh")]
  assert calls[4] == ["python3", "-m", "pip", "install", "--user", "uv"]
  assert calls[5] == ["python3", "-m", "uv", "venv", "--allow-existing", "--python=>=3.11,<3.14",
                      "switch-jax-venv"]
  assert calls[6][:4] == ["python3", "-m", "uv", "pip"]
  assert calls[6][-1] == "./switch_jax-0.1.0-py3-none-any.whl[tpu]"
  assert calls[-1][:6] == [VENV_PYTHON, "-m", "switch_jax.cli.main", "train", "--distributed",
                           "--gin_file=models/switch_base_8.gin"]
  assert '--gin.MODEL_DIR="gs://bkt/a\\"$(touch pwned)"' in calls[-1]
  assert "--gin.TRAIN_STEPS=7" in calls[-1] and "--gin.TRAIN_STEPS=100000" not in calls[-1]
  assert not list(tmp_path.rglob("pwned"))


def test_tpu_pod_reuses_a_ready_slice_and_deletes_it_even_after_a_failure(sandbox):
  tmp_path, env = sandbox
  env = {**env, **POD_ENV, "DRY_RUN": "0", "SKIP_INSTALL": "1", "DELETE": "1",
         "DESCRIBE_STATE": "READY", "TRAIN_RC": "3"}
  result = _run_script("tpu_pod.sh", env, tmp_path)
  assert result.returncode == 3
  assert [c[4] for c in _calls(tmp_path) if c[0] == "gcloud"] == ["describe", "ssh", "delete"]


def test_tpu_pod_refuses_a_preempted_slice(sandbox):
  tmp_path, env = sandbox
  env = {**env, **POD_ENV, "DRY_RUN": "0", "SKIP_INSTALL": "1", "DESCRIBE_STATE": "PREEMPTED"}
  result = _run_script("tpu_pod.sh", env, tmp_path)
  assert result.returncode == 2
  assert "PREEMPTED" in result.stderr
  assert "gcloud compute tpus tpu-vm delete switch-base-8" in result.stderr
  assert len(_calls(tmp_path)) == 1


def test_tpu_pod_names_a_missing_variable(sandbox):
  tmp_path, env = sandbox
  env = {k: v for k, v in {**env, **POD_ENV}.items() if k != "ZONE"}
  result = _run_script("tpu_pod.sh", env, tmp_path)
  assert result.returncode != 0
  assert "ZONE" in result.stderr and result.stdout == ""


def test_tpu_pod_rejects_a_bucket_that_is_not_a_bucket_name(sandbox):
  tmp_path, env = sandbox
  env = {**env, **POD_ENV, "BUCKET": "b$(touch pwned)", "SKIP_INSTALL": "1"}
  result = _run_script("tpu_pod.sh", env, tmp_path)
  assert result.returncode == 2
  assert "not a bucket name" in result.stderr
  assert not list(tmp_path.rglob("pwned"))


def test_local_dry_run_prints_the_local_command(sandbox):
  tmp_path, env = sandbox
  result = _run_script("local.sh", {**env, "DRY_RUN": "1"}, tmp_path)
  assert (result.returncode, result.stdout) == (
      0, "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 switch-jax quickstart --num_cpu_devices=8\n")
  env = {**env, "NUM_DEVICES": "4", "MODEL_DIR": "/tmp/my run",
         "GIN_FILES": "models/tiny_switch.gin runs/pretrain.gin",
         "GIN_BINDINGS": "TRAIN_STEPS=10\nMIXTURE_OR_TASK_NAME=\"embedded\""}
  result = _run_script("local.sh", env, tmp_path, "--dry_run")
  assert result.returncode == 0, result.stderr
  assert result.stdout == textwrap.dedent("""\
      GLIBC_TUNABLES=glibc.malloc.hugetlb=1 switch-jax train --num_cpu_devices=4 --gin_file=models/tiny_switch.gin \
--gin_file=runs/pretrain.gin '--gin.MODEL_DIR="/tmp/my run"' --gin.TRAIN_STEPS=10 \
'--gin.MIXTURE_OR_TASK_NAME="embedded"'
      """)


# ------------------------------------------------------------ input checks

GOOD = dict(name="my-tpu", zone="us-central2-b", project="my-project", accelerator_type="v4-32",
            package="switch-jax==0.1.0", gin_files=GIN_FILES, gin_bindings={},
            model_dir="gs://my-bucket/run", tfds_data_dir="gs://my-bucket/tfds")


@pytest.mark.parametrize("change, message", [
    ({"name": "My_TPU"}, "TPU name"),
    ({"name": "-tpu"}, "TPU name"),
    ({"name": "tpu-"}, "TPU name"),
    ({"name": "t" * 64}, "longer than 63"),
    ({"name": "tpu;reboot"}, "TPU name"),
    ({"zone": "us-central2"}, "zone"),
    ({"project": "My Project"}, "project"),
    ({"accelerator_type": "v4_32"}, "accelerator type"),
    ({"runtime_version": "base; id"}, "runtime version"),
    ({"model_dir": "/tmp/run"}, "must be on Cloud Storage"),
    ({"model_dir": "gs://My-Bucket/run"}, "not a bucket name"),
    ({"model_dir": "gs://b$(id)/run"}, "not a bucket name"),
    ({"model_dir": "gs://bkt/run\nid"}, "control character"),
    ({"model_dir": "gs://bkt/run\u2028id"}, "control character"),
    ({"tfds_data_dir": "/data/tfds"}, "must be on Cloud Storage"),
    ({"gin_bindings": {"A B": "1"}}, "gin binding name"),
    ({"gin_bindings": {"X": "1\nY = 2"}}, "control character"),
    ({"gin_bindings": {"MODEL_DIR": '"gs://b/x"'}}, "MODEL_DIR is given twice"),
    ({"gin_bindings": {"X": [1, 2]}}, "pass gin text as a string"),
    ({"gin_files": []}, "no gin files"),
    ({"gin_files": ["--distributed"]}, "looks like a flag"),
    ({"extra_flags": ["rm"]}, "must start with '--'"),
    ({"spot": True, "preemptible": True}, "spot"),
    ({"package": "dist/missing.whl"}, "no such file"),
    ({"package": "switch-jax; id"}, "expected a requirement"),
    ({"package": "git+file:///etc"}, "git+https"),
    ({"package": None}, "no package to install"),
    ({"python": "python3; id"}, "remote python"),
    ({"python": "--index-url=x"}, "remote python"),
])
def test_invalid_inputs_raise_user_errors(change, message):
  with pytest.raises(UserError, match=re.escape(message)):
    launch.tpu_plan(**{**GOOD, **change})


def test_invalid_local_inputs_raise_user_errors():
  with pytest.raises(UserError, match="positive integer"):
    launch.local_train_command(0, ["runs/pretrain.gin"])
  with pytest.raises(UserError, match="positive integer"):
    launch.local_quickstart_command(True)


def test_cli_reports_user_errors_on_one_line(capsys):
  assert cli.main(["launch", "tpu", "--dry_run", "--name=my-tpu", "--zone=us-central2-b",
                   "--project=my-project", "--accelerator_type=v4-32", "--skip_install",
                   "--gin_file=runs/pretrain.gin", "--model_dir=/tmp/run"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("switch-jax launch: error: model dir '/tmp/run' must be on Cloud")
  assert cli.main(["launch", "local", "--dry_run", "--gin=NOEQUALS"]) == 2
  assert "expected NAME=VALUE" in capsys.readouterr().err


def test_cli_refuses_the_trainers_gin_spellings(capsys):
  # The one CLI takes --gin.NAME=VALUE out before parsing; launch would lose it.
  assert cli.main(["launch", "local", "--dry_run", "--gin.TRAIN_STEPS=5"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("switch-jax launch: error: launch takes gin bindings as --gin NAME=VALUE")


def test_huge_page_env_adds_the_tunable_once_and_keeps_the_users():
  assert launch.huge_page_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert launch.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})[
      "GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "HOME": "/h"}
  assert launch.huge_page_env(off) == off


def test_local_runs_the_command_as_an_argv_list(sandbox):
  tmp_path, env = sandbox
  stub = tmp_path / "bin" / "switch-jax"
  stub.write_text(STUB_PYTHON.replace("NAME", "switch-jax")
                  + 'echo "$GLIBC_TUNABLES" > "$LOG_DIR/../tunables"\n')
  stub.chmod(0o755)
  result = _run_script("local.sh", {**env, "OUTPUT_DIR": "out $(touch pwned)"}, tmp_path)
  assert result.returncode == 0, result.stderr
  assert _calls(tmp_path) == [["switch-jax", "quickstart", "--num_cpu_devices=8",
                               "--output_dir=out $(touch pwned)"]]
  assert not list(tmp_path.rglob("pwned"))
  assert (tmp_path / "tunables").read_text() == "glibc.malloc.hugetlb=1\n"
