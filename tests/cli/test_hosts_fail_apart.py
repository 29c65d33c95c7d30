"""Hosts of a pod that fail apart, on a simulated 2-process pod.

Two `switch-jax train --distributed` processes on this machine, 4 CPU
devices each, form one JAX runtime of 8 devices; the tiny Switch model's 8
experts lie on the mesh (1, 8, 1), so every step's all-to-all crosses the
processes (XLA:CPU's gloo collectives). Started directly, not through the
fake gcloud (test_pod_simulation.py does that, with a wheel and venvs).

1. SIGKILL of process 1 mid-run: process 0 must not hang in its next
   collective. It stops within --heartbeat_timeout with one line naming the
   lost process and the step a re-run resumes from, exit status 75; the
   last complete checkpoint is intact.
2. The relaunch of both resumes from that step, with process 1 stopped
   (SIGSTOP) for a few seconds while a save is in flight: both go on, every
   step is saved whole, and the final parameters equal, bit for bit, those
   of an uninterrupted run.

What this does not show: a coordinator (process 0) that dies. Then JAX's
own client aborts the others within a second, from C++ (SIGABRT, its own
message "the leader task was preempted/died", a stack trace): bounded, but
not our line (cli/host_watchdog.py says why).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

import xla_cache

from switch_jax import run_logging
from switch_jax.checkpoints import model_format

REPO = Path(__file__).resolve().parents[2]
STEPS, PERIOD = 12, 4
HEARTBEAT_TIMEOUT = 10  # short for the test; long enough for the 3 s stall below
STALL = 3.0
LOST_PROCESS_EXIT = 75  # cli/host_watchdog.py's (a literal: this file also runs on older code)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def pod(tmp_path_factory, corpus):
  """launch(model_dir, *extra_flags) -> [process 0, process 1], each
  logging to model_dir/process-<i>.log."""
  root, vocab = corpus
  cache = tmp_path_factory.mktemp("xla-cache")  # the runs compile the same steps once
  bindings = {
      "MODEL_DIR": None, "MIXTURE_OR_TASK_NAME": '"local_span_corruption"',
      "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 8}", "TRAIN_STEPS": STEPS,
      "BATCH_SIZE": 8, "ModelConfig.num_experts": 8, "ModelConfig.vocab_size": 256,
      "local_files.train": f'"{root / "train.txt"}"',
      "local_files.validation": f'"{root / "validation.txt"}"',
      "local_vocabulary_path.path": f'"{vocab}"', "LoopConfig.log_period": 1,
      "train.eval_dataset": None, "CheckpointConfig.period": PERIOD,
      "CheckpointConfig.keep": None, "make_optimizer.name": "'adam'"}
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", TF_CPP_MIN_LOG_LEVEL="3",
             **xla_cache.env(cache))
  started = []

  def launch(model_dir: Path, *extra_flags: str) -> list:
    model_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    gin = {**bindings, "MODEL_DIR": f'"{model_dir}"'}
    procs = []
    for index in range(2):
      command = [sys.executable, "-m", "switch_jax.cli.main", "train", "--distributed",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={index}", "--gin_file=models/tiny_switch.gin",
                 "--gin_file=runs/pretrain.gin", "--gin_file=mesh/expert_parallel.gin",
                 "--mesh_shape=1,8,1", *[f"--gin.{k}={v}" for k, v in gin.items()],
                 *extra_flags]
      with open(model_dir / f"process-{index}.log", "w") as log:
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    started.extend(procs)
    return procs
  yield launch
  for proc in started:  # a failed test leaves none running
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGCONT)
      proc.kill()
      proc.wait()


def _log(model_dir: Path, index: int) -> str:
  return (model_dir / f"process-{index}.log").read_text()


def _wait_all(procs, model_dir, timeout=300) -> list[int]:
  deadline = time.monotonic() + timeout
  codes = []
  for proc in procs:
    try:
      codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      pytest.fail(f"a trainer hung; process 0 said:\n{_log(model_dir, 0)[-3000:]}")
  return codes


def _wait_for(condition, procs, model_dir, what, timeout=300, poll=0.02):
  deadline = time.monotonic() + timeout
  while not condition():
    if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
      pytest.fail(f"no {what}; process 0 said:\n{_log(model_dir, 0)[-3000:]}\n"
                  f"process 1 said:\n{_log(model_dir, 1)[-3000:]}")
    time.sleep(poll)


def _logged_steps(model_dir: Path) -> set[int]:
  if not (model_dir / "metrics.jsonl").is_file():
    return set()
  return {r["step"] for r in run_logging.read_records(model_dir) if "loss" in r}


def _params(step_dir: Path) -> dict:
  """The step's parameters, flat: {"encoder/.../kernel": array}."""
  _, params = model_format.load_model(step_dir)
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _differing(a: dict, b: dict) -> list[str]:
  assert a.keys() == b.keys() and len(a) > 20
  return [k for k in a if not np.array_equal(a[k], b[k])]


def _steps(model_dir: Path) -> list[int]:
  return sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(pod, tmp_path_factory):
  """An uninterrupted run (30-60 s on 2 cores, the first compile included)."""
  run = tmp_path_factory.mktemp("reference")
  procs = pod(run)
  assert _wait_all(procs, run) == [0, 0], _log(run, 0)[-3000:] + _log(run, 1)[-3000:]
  assert _steps(run) == [4, 8, 12]
  return run


@pytest.fixture(scope="module")
def killed(pod, reference, tmp_path_factory):
  """(a run whose process 1 got SIGKILL after step 5, seconds from the kill
  to process 0's exit, process 0's exit status)."""
  del reference  # first: it fills the compilation cache
  run = tmp_path_factory.mktemp("killed")
  procs = pod(run, f"--heartbeat_timeout={HEARTBEAT_TIMEOUT}")
  _wait_for(lambda: max(_logged_steps(run), default=0) >= 5, procs, run, "step 5")
  procs[1].kill()  # SIGKILL: no handler, no save, no goodbye
  killed_at = time.monotonic()
  code = _wait_all(procs[:1], run, timeout=6 * HEARTBEAT_TIMEOUT)[0]
  stopped_after = time.monotonic() - killed_at
  assert procs[1].wait() == -signal.SIGKILL
  return run, stopped_after, code


def test_a_killed_host_stops_the_other_in_bounded_time_with_one_line(killed, reference):
  # Before, process 0 waited in the step's all-to-all until JAX's coordination
  # service gave process 1 up (100 s), then aborted from C++ with a stack trace.
  run, stopped_after, code = killed
  out = _log(run, 0)
  assert code == LOST_PROCESS_EXIT, out[-3000:]
  assert stopped_after < 3 * HEARTBEAT_TIMEOUT, stopped_after
  newest = model_format.resolve(run)
  assert newest.step in (4, 8) and max(_logged_steps(run)) < STEPS
  line = (f"switch-jax: error: process 0 lost process 1: no heartbeat for {HEARTBEAT_TIMEOUT} s "
          f"(--heartbeat_timeout); stopping with exit status 75. Re-run the same command on "
          f"every host to resume from step {newest.step} ({run / 'checkpoints' / str(newest.step)}),"
          " the newest complete checkpoint.")
  assert line in out.splitlines(), out[-3000:]
  assert "Traceback" not in out and "Check failure" not in out
  # The last complete checkpoint is intact: it holds the uninterrupted run's step.
  assert not _differing(_params(newest.path), _params(reference / "checkpoints" /
                                                      str(newest.step)))
  print(f"process 0 stopped {stopped_after:.1f} s after the kill, newest step {newest.step}")


def test_a_relaunch_with_a_host_stalled_at_a_save_resumes_to_the_uninterrupted_parameters(
    pod, killed, reference):
  run, _, _ = killed
  resumed_from = model_format.resolve(run).step
  stalled_save = resumed_from + PERIOD
  procs = pod(run, f"--heartbeat_timeout={HEARTBEAT_TIMEOUT}")
  checkpoints = run / "checkpoints"
  in_flight = lambda: list(checkpoints.glob(f"{stalled_save}.orbax-checkpoint-tmp*"))
  _wait_for(lambda: in_flight() or (checkpoints / str(stalled_save)).exists(), procs, run,
            f"save of step {stalled_save}", poll=0.01)
  assert in_flight(), "the save finished before the test could stall process 1"
  os.kill(procs[1].pid, signal.SIGSTOP)  # one host stops answering mid-save ...
  time.sleep(STALL)  # ... for a while: the other one waits for it, not forever
  finalized_while_stalled = (checkpoints / str(stalled_save)).exists()
  os.kill(procs[1].pid, signal.SIGCONT)
  codes = _wait_all(procs, run)
  out = _log(run, 0)
  assert codes == [0, 0], out[-3000:] + _log(run, 1)[-3000:]
  assert f"Resuming from {checkpoints / str(resumed_from)} at step {resumed_from}" in out
  assert f"Done at step {STEPS}" in out and "lost process" not in out
  # Both hosts wrote every step whole: orbax renamed none of them early.
  assert _steps(run) == [4, 8, 12] and not list(checkpoints.glob("*tmp*"))
  assert not _differing(_params(checkpoints / str(STEPS)),
                        _params(reference / "checkpoints" / str(STEPS)))
  # The comparison can fail: the previous step differs wherever training moved.
  assert len(_differing(_params(checkpoints / str(STEPS - PERIOD)),
                        _params(reference / "checkpoints" / str(STEPS)))) > 20
  print(f"resumed from step {resumed_from}; step {stalled_save} finalized while process 1 "
        f"was stopped: {finalized_while_stalled}")


# ------------------------------------------- what the launcher says about it

FAKE_GCLOUD = REPO / "tests" / "fake_tpu" / "gcloud"
ZONE, PROJECT = "us-central2-b", "my-project"

# The venv's Python on each fake worker: worker 1's trainer is killed outright,
# worker 0's stops as a survivor does (the watchdog's own line, exit status 75).
FAKE_TRAINER = """\
import os, signal, sys
sys.path.insert(0, {repo!r})
from switch_jax.cli import host_watchdog
if os.environ["TPU_WORKER_ID"] == "1":
  os.kill(os.getpid(), signal.SIGKILL)
print("step 5/12  loss 5.3497", flush=True)
host_watchdog.stop_for_lost(0, "process 1", 10, "Re-run the same command on every host to "
                            "resume from step 4 ({model_dir}/checkpoints/4), the newest "
                            "complete checkpoint.")
"""


def _fake_step(step_dir: Path) -> None:
  """A directory that model_format takes for a complete training step."""
  from orbax.checkpoint import step as orbax_step  # pylint: disable=import-outside-toplevel
  for item in ("params", "meta"):
    (step_dir / item).mkdir(parents=True)
  assert orbax_step.is_path_finalized(step_dir)


def test_the_launcher_names_the_lost_worker_and_the_step_to_resume_from(tmp_path):
  # Before, `launch tpu` ended with gcloud's exit status and nothing else.
  model_dir = tmp_path / "bucket" / "run"
  _fake_step(model_dir / "checkpoints" / "4")
  (model_dir / "checkpoints" / "8.orbax-checkpoint-tmp-1").mkdir()  # a save cut short
  env = {k: v for k, v in os.environ.items() if k not in (
      "DRY_RUN", "SKIP_INSTALL", "DELETE", "SPOT", "PREEMPTIBLE", "BUCKET", "REMOTE_PYTHON",
      "PACKAGE")}
  env.update(PATH=f"{FAKE_GCLOUD.parent}:{os.environ['PATH']}", PYTHON=sys.executable,
             FAKE_GCLOUD_DIR=str(tmp_path / "cloud"), FAKE_TPU_PYTHON=sys.executable,
             TPU_NAME="pod", ZONE=ZONE, PROJECT=PROJECT, ACCELERATOR_TYPE="v4-16",
             GIN_FILES="models/tiny_switch.gin runs/pretrain.gin", MODEL_DIR=str(model_dir),
             TFDS_DATA_DIR=str(tmp_path / "bucket" / "tfds"), DRY_RUN="0", SKIP_INSTALL="1")
  subprocess.run([sys.executable, str(FAKE_GCLOUD), "compute", "tpus", "tpu-vm", "create", "pod",
                  f"--zone={ZONE}", f"--project={PROJECT}", "--accelerator-type=v4-16"],
                 env=env, check=True, capture_output=True)
  trainer = tmp_path / "fake_trainer.py"
  trainer.write_text(FAKE_TRAINER.format(repo=str(REPO), model_dir=model_dir))
  for worker in range(2):
    python = (tmp_path / "cloud" / "tpus" / PROJECT / ZONE / "pod" / f"worker-{worker}" / "home"
              / "switch-jax-venv" / "bin" / "python")
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/bash\nexec {sys.executable} {trainer} "$@"\n')
    python.chmod(0o755)
  done = subprocess.run([str(REPO / "launch" / "tpu_pod.sh"), "--shared_filesystem"], env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1, done.stdout + done.stderr
  said = [line for line in done.stderr.splitlines() if line.startswith("switch-jax launch:")]
  assert said == [
      "switch-jax launch: training on slice pod failed: the ssh command exited with status 1.",
      "switch-jax launch: process 1 (worker 1) stopped answering: killed (SIGKILL, out of "
      "memory) or its VM gone, so it said nothing; process 0 stopped on losing it (exit status "
      "75).",
      "switch-jax launch: re-run the same command to resume from step 4, the newest complete "
      "checkpoint."], done.stdout[-3000:] + done.stderr
  # gcloud's own words (the fake's) stay: each worker's exit status.
  assert "command failed on worker(s) 0 (exit 75), 1 (exit -9)" in done.stderr
  assert "[worker 0] step 5/12" in done.stdout  # the trainers' lines still pass through
