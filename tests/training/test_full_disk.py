"""A save that fails (a full disk, a bucket that starts refusing) stops the
run in one line naming the step, leaves the previous checkpoint intact and
restorable, and leaves no half step that a restart takes for whole; orbax
deletes an old step (keep=N) only once the new one is finalized.

The small disk is a tmpfs with a size limit (mounting needs root; the test
skips where mount is refused). The failing bucket is fake-gcs-server behind
a loopback proxy that answers 403 once told to (tests/gcs_emulator.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gcs_emulator
import small_train_state as small
from small_disk import grow, mounted as small_disk
from switch_jax import storage
from switch_jax.checkpoints import train_state
from switch_jax.errors import UserError


def _restore(model_dir, keep=1):
  checkpointer = train_state.TrainCheckpointer(model_dir, keep=keep)
  try:
    return checkpointer.restore_latest(small.abstract(small.make(0)))
  finally:
    checkpointer.close()


FULL = (r"saving checkpoint 4 in .*checkpoints failed \(ValueError: RESOURCE_EXHAUSTED: .*No space "
        r"left on device.*\); the last complete checkpoint is step 2, intact\. Free space or "
        r"restore access, then run the same command again to resume from it$")


# Where an asynchronous save's failure surfaces: the next save waits for it,
# and so does the close at the end of the run.
@pytest.mark.parametrize("mode", ["sync", "async_next_save", "async_close"])
def test_a_save_that_fills_the_disk_fails_in_one_line_and_the_previous_step_survives(
    tmp_path, mode):
  with small_disk(tmp_path / "disk", 600) as disk:
    # keep=1: a finished step 4 would delete step 2; a failed one must not.
    checkpointer = train_state.TrainCheckpointer(disk / "run", keep=1, async_save=mode != "sync")
    small.save(checkpointer, small.make(2, kilobytes=64))
    checkpointer.wait()
    with pytest.raises(UserError, match=FULL) as failed:
      small.save(checkpointer, small.make(4, kilobytes=1024))  # does not fit
      if mode == "async_next_save":
        small.save(checkpointer, small.make(6, kilobytes=8))
      checkpointer.close()
    assert "\n" not in str(failed.value)
    checkpointer.close()  # nothing left in flight: closes quietly
    checkpoints = disk / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4.orbax-checkpoint-tmp"]
    grow(disk, 8192)
    step, state, _, _ = _restore(disk / "run")  # the restart
    assert step == 2
    small.assert_equal(state, small.make(2, kilobytes=64))
    checkpointer = train_state.TrainCheckpointer(disk / "run", keep=1, async_save=False)
    small.save(checkpointer, small.make(4, kilobytes=1024))
    checkpointer.close()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4"]  # step 2 went after 4 was whole


# A process of its own: pytest replaces sys.unraisablehook in each test,
# and that hook is where tensorstore's errors from a closed loop go.
_FILL_IN_THE_BACKGROUND = """
import sys
import small_train_state as small
from switch_jax.checkpoints import train_state
checkpointer = train_state.TrainCheckpointer(sys.argv[1], keep=3, async_save=True)
small.save(checkpointer, small.make(2, kilobytes=16, arrays=100))
checkpointer.wait()
try:
  small.save(checkpointer, small.make(4, kilobytes=2048, arrays=100))  # does not fit
  small.save(checkpointer, small.make(6, kilobytes=16, arrays=100))  # step 4's failure surfaces
  checkpointer.close()
except train_state.UserError as e:  # as the CLI prints it
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)
"""


def test_a_failed_asynchronous_save_of_many_arrays_prints_no_traceback(tmp_path):
  # Abandoned array writes printed tracebacks (tensorstore calling into
  # orbax's closed event loop, orbax's logs): 51 here before quiet_failures.
  # Now: orbax's log lines, without tracebacks, then the run's one line.
  with small_disk(tmp_path / "disk", 1024) as disk:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]))
    result = subprocess.run([sys.executable, "-c", _FILL_IN_THE_BACKGROUND, str(disk / "run")],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines()
           if not line.startswith(("W0000", "I0000", "E0000", "WARNING: All log messages"))]
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, (
      result.stderr[-3000:])
  assert lines[-1].startswith("error: saving checkpoint 4 in "), lines[-3:]
  assert all(line.startswith("ERROR:absl:") for line in lines[:-1]), lines


@pytest.fixture(name="failing_bucket")
def fixture_failing_bucket(tmp_path, monkeypatch):
  """(the proxy) of an emulator whose gs:// clients go through a proxy
  that can start refusing every request."""
  with gcs_emulator.failing(tmp_path / "emulator.log") as proxy:
    for key, value in gcs_emulator.environment(proxy.url).items():
      monkeypatch.setenv(key, value)
    gcs_emulator.forget_clients()
    yield proxy
  gcs_emulator.forget_clients()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_bucket_that_starts_refusing_mid_save_fails_in_one_line_and_a_restart_resumes(
    failing_bucket, async_save):
  run = "gs://bucket/refused_run"
  checkpointer = train_state.TrainCheckpointer(run, keep=1, async_save=async_save)
  before = failing_bucket.forwarded
  small.save(checkpointer, small.make(2))
  checkpointer.wait()
  requests_of_a_save = failing_bucket.forwarded - before
  # Permission lost halfway through the next save: 403 to everything after.
  failing_bucket.refuse(True, after=requests_of_a_save // 2)
  with pytest.raises(UserError, match=r"saving checkpoint 4 in gs://bucket/refused_run/"
                                      r"checkpoints failed \(.*\); the checkpoints could not "
                                      r"be listed \(OSError: Forbidden: .*\)\. Free space or "
                                      r"restore access") as failed:
    # (The save's own error depends on the request refused: gcsfs reads a
    # 403 on a listing as "not a directory".)
    small.save(checkpointer, small.make(4))
    checkpointer.close()
  assert "\n" not in str(failed.value)
  failing_bucket.refuse(False)
  checkpointer.close()
  assert failing_bucket.refused > 0
  step4 = storage.path(run) / "checkpoints" / "4"
  assert storage.files(step4)  # half a step is on the bucket ...
  assert not (step4 / "commit_success.txt").exists()  # ... never marked whole
  step, state, _, _ = _restore(run)  # the restart
  assert step == 2
  small.assert_equal(state, small.make(2))
