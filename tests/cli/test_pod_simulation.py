"""A pod run simulated end to end, through launch/tpu_pod.sh with DRY_RUN=0.

A fake `gcloud` (tests/fake_tpu/gcloud) plays Cloud TPU: a v4-16 slice is
two workers, folders on this machine, and `ssh --worker=all` runs the
command in each as its own process with its own home and environment. The
real launcher creates the slice, copies a wheel of this checkout to every
worker, sets each one up (uv, a virtualenv, the wheel in it) and runs the
same `switch-jax train --distributed` on both: one JAX runtime of 2
processes x 4 CPU devices, the tiny Switch model's 8 experts spread over
both processes (mesh/expert_parallel.gin), checkpoints in a folder both
see (the "bucket"). One worker's trainer then gets SIGTERM, as preemption
announces itself; both must stop at the same step with that step saved.
The launcher then refuses the PREEMPTED slice, the slice is deleted, and
the same launch creates a new one, installs again and resumes: the final
parameters must equal, bit for bit, those of an uninterrupted run.

What this does not exercise (docs/pod.md): real gcloud, ssh and the TPU
metadata server, TPU chips and their interconnect, gs:// (a shared local
folder instead), and downloading jax[tpu] and the other dependencies (the
fake VM image has them; docs/pod.md says how).
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

import package_wheel
import xla_cache

from switch_jax import run_logging
from switch_jax.checkpoints import model_format
from switch_jax.cli.commands import gin_flags
from switch_jax.errors import UserError

REPO = Path(__file__).resolve().parents[2]
FAKE_GCLOUD = REPO / "tests" / "fake_tpu" / "gcloud"
ZONE, PROJECT = "us-central2-b", "my-project"
SLICE_FLAGS = [f"--zone={ZONE}", f"--project={PROJECT}"]
GIN_FILES = "models/tiny_switch.gin runs/pretrain.gin mesh/expert_parallel.gin"
STEPS, PERIOD = 20, 10  # periodic saves at 10 and 20; a preemption saves its own step


# ------------------------------------------------------------ the fake cloud


@pytest.fixture
def cloud(tmp_path):
  """(run the fake gcloud, the cloud folder)."""
  root = tmp_path / "cloud"
  env = dict(os.environ, FAKE_GCLOUD_DIR=str(root), FAKE_TPU_PYTHON=sys.executable)

  def gcloud(*args, check=True):
    done = subprocess.run([sys.executable, str(FAKE_GCLOUD), "compute", "tpus", "tpu-vm",
                           *args], env=env, capture_output=True, text=True, timeout=120)
    if check:
      assert done.returncode == 0, done.stdout + done.stderr
    return done
  return gcloud, root


@pytest.mark.parametrize("accelerator_type, hosts, chips", [
    ("v4-8", 1, 4), ("v4-16", 2, 4), ("v4-32", 4, 4), ("v5p-16", 2, 4),
    ("v5litepod-8", 1, 8), ("v5litepod-16", 4, 4), ("v6e-32", 8, 4)])
def test_the_fake_makes_a_worker_per_host(cloud, accelerator_type, hosts, chips):
  gcloud, root = cloud
  gcloud("create", "t", *SLICE_FLAGS, f"--accelerator-type={accelerator_type}")
  state = json.loads((root / "tpus" / PROJECT / ZONE / "t" / "slice.json").read_text())
  assert (state["hosts"], state["chipsPerHost"], state["state"]) == (hosts, chips, "READY")


def test_the_fake_ssh_runs_every_worker_apart_and_fails_if_one_fails(cloud):
  gcloud, root = cloud
  missing = gcloud("describe", "t", *SLICE_FLAGS, "--format=value(state)", check=False)
  assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
  gcloud("create", "t", *SLICE_FLAGS, "--accelerator-type=v4-16")
  assert gcloud("describe", "t", *SLICE_FLAGS, "--format=value(state)").stdout == "READY\n"
  again = gcloud("create", "t", *SLICE_FLAGS, "--accelerator-type=v4-16", check=False)
  assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr

  (root / "wheel.whl").write_text("w")
  gcloud("scp", str(root / "wheel.whl"), "t:", "--worker=all", *SLICE_FLAGS)
  show = ('echo "$TPU_WORKER_ID $SWITCH_JAX_PROCESS_ID/$SWITCH_JAX_NUM_PROCESSES '
          '$JAX_NUM_CPU_DEVICES $JAX_COORDINATOR_ADDRESS $(pwd) $(cat wheel.whl)"')
  done = gcloud("ssh", "t", *SLICE_FLAGS, "--worker=all", f"--command={show}")
  lines = sorted(done.stdout.splitlines())
  workers = root / "tpus" / PROJECT / ZONE / "t"
  port = lines[0].split()[5]
  assert port.startswith("127.0.0.1:")
  assert lines == [f"[worker {i}] {i} {i}/2 4 {port} {workers / f'worker-{i}' / 'home'} w"
                   for i in range(2)]
  one_fails = gcloud("ssh", "t", *SLICE_FLAGS, "--worker=all",
                     "--command=test $TPU_WORKER_ID = 0", check=False)
  assert one_fails.returncode == 1 and "worker(s) 1 (exit 1)" in one_fails.stderr
  gcloud("simulate-preemption", "t", *SLICE_FLAGS)
  assert gcloud("describe", "t", *SLICE_FLAGS, "--format=value(state)").stdout == "PREEMPTED\n"
  gcloud("delete", "t", *SLICE_FLAGS, "--quiet")
  assert not workers.exists()


# ------------------------------------------------- where the processes meet


def _args(distributed=True, **flags):
  return type("Args", (), {"distributed": distributed, "coordinator_address": None,
                           "num_processes": None, "process_id": None, **flags})()


def test_distributed_settings_come_from_flags_then_the_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", gin_flags.NUM_PROCESSES_ENV: "4",
         gin_flags.PROCESS_ID_ENV: "3"}
  assert gin_flags.distributed_settings(_args(), env) == {
      "coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}
  assert gin_flags.distributed_settings(_args(process_id=1), env)["process_id"] == 1
  assert gin_flags.distributed_settings(_args(), {}) == {}  # Cloud TPU: JAX finds them
  assert gin_flags.distributed_settings(_args(distributed=False), env) == {}
  with pytest.raises(UserError, match="pass --distributed"):
    gin_flags.distributed_settings(_args(distributed=False, num_processes=2), {})
  with pytest.raises(UserError, match="not in 0..3"):
    gin_flags.distributed_settings(_args(process_id=4), env)
  with pytest.raises(UserError, match="is not an integer"):
    gin_flags.distributed_settings(_args(), {gin_flags.NUM_PROCESSES_ENV: "two"})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_waiting_for_the_coordinator_returns_once_it_listens_and_names_it_if_not():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    gin_flags.wait_for_coordinator(address, 5.0, 1)  # returns: something listens
  port = _free_port()
  start = time.monotonic()
  with pytest.raises(UserError, match=rf"process 1 cannot reach the coordinator at "
                                      rf"127\.0\.0\.1:{port} within 0\.5 s"):
    gin_flags.wait_for_coordinator(f"127.0.0.1:{port}", 0.5, 1)
  assert time.monotonic() - start < 5
  with pytest.raises(UserError, match="expected HOST:PORT"):
    gin_flags.wait_for_coordinator("localhost", 1.0, 1)


def test_a_host_that_cannot_reach_the_coordinator_fails_in_one_line_not_a_hang():
  # Before, jax.distributed.initialize waited its 300 s, then aborted the
  # process from C++ (SIGABRT) with neither the address nor the timeout.
  port = _free_port()
  proc = subprocess.run(
      [sys.executable, "-m", "switch_jax.cli.main", "train", "--distributed",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
       "--coordinator_timeout=1", "--gin_file=models/tiny_switch.gin"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert f"cannot reach the coordinator at 127.0.0.1:{port} within 1 s" in proc.stderr
  assert "Traceback" not in proc.stderr


# ------------------------------------------------------------ the pod run


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  return package_wheel.build(tmp_path_factory)


def _launch_env(tmp_path, corpus, wheel, name, model_dir, spot=False):
  root, vocab = corpus
  bindings = {
      "MIXTURE_OR_TASK_NAME": '"local_span_corruption"',
      "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 8}", "TRAIN_STEPS": STEPS,
      "BATCH_SIZE": 8, "ModelConfig.num_experts": 8, "ModelConfig.vocab_size": 256,
      "local_files.train": f'"{root / "train.txt"}"',
      "local_files.validation": f'"{root / "validation.txt"}"',
      "local_vocabulary_path.path": f'"{vocab}"', "LoopConfig.log_period": 1,
      "train.eval_dataset": None, "CheckpointConfig.period": PERIOD,
      "CheckpointConfig.keep": None, "make_optimizer.name": "'adam'"}
  worker_env = {"TF_CPP_MIN_LOG_LEVEL": "3",
                # Both launches compile the same steps: the second one reads them.
                **xla_cache.env(tmp_path / "xla-cache")}
  env = {k: v for k, v in os.environ.items() if k not in (
      "DRY_RUN", "SKIP_INSTALL", "DELETE", "SPOT", "PREEMPTIBLE", "BUCKET", "REMOTE_PYTHON")}
  env.update(PATH=f"{FAKE_GCLOUD.parent}:{os.environ['PATH']}", PYTHON=sys.executable,
             FAKE_GCLOUD_DIR=str(tmp_path / "cloud"), FAKE_TPU_PYTHON=sys.executable,
             FAKE_TPU_WORKER_ENV=json.dumps(worker_env), TPU_NAME=name, ZONE=ZONE,
             PROJECT=PROJECT, ACCELERATOR_TYPE="v4-16", GIN_FILES=GIN_FILES,
             GIN_BINDINGS="\n".join(f"{k}={v}" for k, v in bindings.items()),
             MODEL_DIR=str(model_dir), TFDS_DATA_DIR=str(tmp_path / "bucket" / "tfds"),
             PACKAGE=str(wheel), DRY_RUN="0", SPOT="1" if spot else "0")
  return env


def _launch(env, started=None):
  proc = subprocess.Popen([str(REPO / "launch" / "tpu_pod.sh"), "--shared_filesystem"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if started is not None:
    started.append(proc)
  return proc


@pytest.fixture
def leftovers(tmp_path):
  """Ends, after the test, any launcher and any worker still running (a
  worker is its own process group, as on its own VM)."""
  launchers = []
  yield launchers
  for proc in launchers:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  for pid_file in (tmp_path / "cloud").glob("tpus/*/*/*/worker-*/pid"):
    try:
      os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except (OSError, ValueError):
      pass


def _finish(proc, timeout=400):
  out = proc.communicate(timeout=timeout)[0]
  return proc.returncode, out


def _worker(tmp_path, name, index):
  return tmp_path / "cloud" / "tpus" / PROJECT / ZONE / name / f"worker-{index}"


def _trainer_pid(shell_pid: int) -> int:
  """The `switch_jax.cli.main train` process at or below a worker's shell."""
  children = {}
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
  todo = [shell_pid]
  while todo:
    pid = todo.pop()
    try:
      if b"switch_jax.cli.main" in Path(f"/proc/{pid}/cmdline").read_bytes():
        return pid
    except OSError:
      pass
    todo += children.get(pid, [])
  raise AssertionError(f"no trainer below worker shell {shell_pid}")


def _params(step_dir):
  """The step's parameters, flat: {"encoder/.../kernel": array}."""
  _, params = model_format.load_model(step_dir)
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _losses(model_dir):
  return {r["step"]: r["loss"] for r in run_logging.read_records(model_dir)}


def _preempted_steps(log: Path):
  return [int(line.split()[4].rstrip(";")) for line in log.read_text().splitlines()
          if line.startswith("Preempted (SIGTERM): saved step")]


def test_a_preempted_pod_run_resumes_to_the_parameters_of_an_uninterrupted_one(
    tmp_path, corpus, wheel, leftovers):
  # Three launches of two trainers each: 2.5-4.7 minutes on 2 cores at a load
  # average of 9-11 (other jobs), 2.8-3.5 minutes of CPU time.
  assert importlib.util.find_spec("uv"), "the simulated workers install with `python3 -m uv`"
  bucket = tmp_path / "bucket"
  started = time.monotonic()

  # 1. The reference: an uninterrupted run, on a slice deleted afterwards.
  reference = bucket / "reference"
  env = _launch_env(tmp_path, corpus, wheel, "reference", reference)
  code, out = _finish(_launch(dict(env, DELETE="1"), leftovers))
  assert code == 0, out[-6000:]
  assert not (tmp_path / "cloud" / "tpus" / PROJECT / ZONE / "reference").exists()
  assert f"Done at step {STEPS}" in out
  assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir()) == [10, 20]
  timings = {"reference": time.monotonic() - started}

  # 2. The same launch on a spot slice; SIGTERM to worker 1's trainer mid-run.
  run = bucket / "run"
  env = _launch_env(tmp_path, corpus, wheel, "pod", run, spot=True)
  proc = _launch(env, leftovers)
  deadline = time.monotonic() + 400
  while not (run / "metrics.jsonl").is_file() or max(_losses(run), default=0) < 3:
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-6000:]
    time.sleep(0.2)
  shell = int((_worker(tmp_path, "pod", 1) / "pid").read_text())
  trainer = _trainer_pid(shell)
  # The trainer runs the wheel installed in the worker's own virtualenv.
  assert Path(f"/proc/{trainer}/cwd").resolve() == _worker(tmp_path, "pod", 1) / "home"
  assert Path(f"/proc/{trainer}/cmdline").read_bytes().startswith(
      b"switch-jax-venv/bin/python\0-m\0switch_jax.cli.main\0train\0--distributed\0")
  signalled = max(_losses(run))
  os.kill(trainer, signal.SIGTERM)
  code, out = _finish(proc)
  assert code == 0, out[-6000:]  # the trainers save and exit 0 (the VM would go down now)
  stops = [_preempted_steps(_worker(tmp_path, "pod", i) / "ssh.log") for i in range(2)]
  assert stops[0] == stops[1] and len(stops[0]) == 1, out[-6000:]  # the same step on both
  stopped = stops[0][0]
  print(f"preempted at step {stopped} (SIGTERM after step {signalled})")
  assert 3 <= stopped < STEPS
  assert model_format.resolve(run).step == stopped  # that step is complete on the "bucket"
  installed = subprocess.run(
      [str(_worker(tmp_path, "pod", 0) / "home" / "switch-jax-venv" / "bin" / "python"), "-c",
       "import switch_jax; print(switch_jax.__file__)"],
      env=dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"]), capture_output=True,
      text=True, check=True, cwd=_worker(tmp_path, "pod", 0) / "home").stdout
  assert installed.startswith(str(_worker(tmp_path, "pod", 0) / "home" / "switch-jax-venv"))
  timings["preempted"] = time.monotonic() - started - sum(timings.values())

  # 3. The slice is gone to PREEMPTED: the launcher says to delete it.
  subprocess.run(["gcloud", "compute", "tpus", "tpu-vm", "simulate-preemption", "pod",
                  *SLICE_FLAGS], env=env, check=True)
  code, out = _finish(_launch(env, leftovers))
  assert code != 0 and "state PREEMPTED" in out and "tpu-vm delete pod" in out, out[-3000:]
  subprocess.run(["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", *SLICE_FLAGS,
                  "--quiet"], env=env, check=True)

  # 4. The same launch again: a new slice, a fresh install, and training resumes.
  code, out = _finish(_launch(env, leftovers))
  assert code == 0, out[-6000:]
  assert "tpu-vm create pod" in out and "Installed 1 package" in out
  assert f"Resuming from {run / 'checkpoints' / str(stopped)} at step {stopped}" in out
  assert f"Done at step {STEPS}" in out
  timings["resumed"] = time.monotonic() - started - sum(timings.values())

  # Bit for bit: the resumed run's parameters and its losses after the stop.
  resumed, uninterrupted = _params(run / "checkpoints" / str(STEPS)), _params(
      reference / "checkpoints" / str(STEPS))
  assert resumed.keys() == uninterrupted.keys() and len(resumed) > 20
  different = [k for k in resumed if not np.array_equal(resumed[k], uninterrupted[k])]
  assert not different, different[:5]
  losses, reference_losses = _losses(run), _losses(reference)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses == reference_losses
  # The comparison can tell one run's steps apart: 10 steps earlier differs wherever
  # training moved.
  earlier = _params(reference / "checkpoints" / str(STEPS - PERIOD))
  assert sum(not np.array_equal(earlier[k], uninterrupted[k]) for k in earlier) > 20
  print("pod simulation timings (s):", {k: round(v, 1) for k, v in timings.items()})
