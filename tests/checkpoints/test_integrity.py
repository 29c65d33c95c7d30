"""Checkpoint manifests (switch_jax/checkpoints/integrity.py): every file of
a step is hashed at its commit, inside what becomes visible at once; a
restore checks them first and sets a step that fails aside for the one
before it; a step from before manifests restores, said to be unverified."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import small_train_state as small
from gcs_emulator import emulator  # noqa: F401  pylint: disable=unused-import  # the fixture
from switch_jax import storage
from switch_jax.checkpoints import integrity, model_format, train_state
from switch_jax.errors import UserError


def _run(tmp_path, steps=(2, 4), async_save=False) -> Path:
  checkpointer = train_state.TrainCheckpointer(tmp_path / "run", keep=3, async_save=async_save)
  for step in steps:
    small.save(checkpointer, small.make(step))
  checkpointer.close()
  return tmp_path / "run" / "checkpoints"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_the_manifest_covers_every_file_of_the_step(tmp_path, async_save):
  step_dir = _run(tmp_path, async_save=async_save) / "4"
  manifest = json.loads((step_dir / integrity.MANIFEST).read_text())
  on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()}
  # All but itself and orbax's commit marker, written after it.
  assert set(manifest["files"]) == on_disk - {integrity.MANIFEST, "commit_success.txt"}
  assert {name.split("/")[0] for name in manifest["files"]} >= {
      "params", "opt_state", "meta", "_CHECKPOINT_METADATA"}
  for name, entry in manifest["files"].items():
    assert entry["size"] == (step_dir / name).stat().st_size
  assert integrity.verify(step_dir) is None


def _flip(file: Path, offset: int = 0) -> None:
  data = bytearray(file.read_bytes())
  data[offset] ^= 0x01
  file.write_bytes(bytes(data))


def _restore(tmp_path):
  checkpointer = train_state.TrainCheckpointer(tmp_path / "run", keep=3)
  try:
    return checkpointer.restore_latest(small.abstract(small.make(0)))
  finally:
    checkpointer.close()


DAMAGE = {
    "one bit of the per-process OCDBT manifest":  # a file the restore never opens
        (lambda step: _flip(step / "params" / "ocdbt.process_0" / "manifest.ocdbt", 40),
         "params/ocdbt.process_0/manifest.ocdbt does not match its sha256"),
    "one bit of the step metadata":  # JSON orbax reads; a flipped bit of a digit still parses
        (lambda step: _flip(step / "_CHECKPOINT_METADATA", (step / "_CHECKPOINT_METADATA")
                            .read_bytes().index(b"1")),
         "_CHECKPOINT_METADATA does not match its sha256"),
    "a file gone": (lambda step: (step / "params" / "_sharding").unlink(),
                    "params/_sharding is missing"),
    "a file cut short": (lambda step: (step / "meta" / "metadata").write_text("{}"),
                         "meta/metadata has 2 bytes, the manifest says"),
    "the manifest itself": (lambda step: (step / integrity.MANIFEST).write_text("{"),
                            "manifest.sha256.json is unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_step_that_fails_its_manifest_is_set_aside_and_the_previous_one_restored(
    tmp_path, capsys, damage):
  checkpoints = _run(tmp_path)
  change, message = DAMAGE[damage]
  change(checkpoints / "4")
  capsys.readouterr()
  step, state, meta, _ = _restore(tmp_path)
  out = capsys.readouterr().out
  assert step == 2 and meta["step"] == 2
  small.assert_equal(state, small.make(2))
  (warning,) = [line for line in out.splitlines() if line.startswith("WARNING")]
  assert warning.startswith(f"WARNING: checkpoint 4 in {checkpoints} fails its manifest: "
                            f"{message}"), warning
  (kept,) = (tmp_path / "run" / "checkpoints_unreadable").iterdir()
  assert kept.name.startswith("4-") and (kept / "params").is_dir()  # never deleted
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2"]


def test_a_step_saved_before_manifests_restores_said_to_be_unverified(tmp_path, capsys):
  checkpoints = _run(tmp_path)
  (checkpoints / "4" / integrity.MANIFEST).unlink()
  capsys.readouterr()
  step, state, _, _ = _restore(tmp_path)
  out = capsys.readouterr().out
  assert step == 4
  small.assert_equal(state, small.make(4))
  assert out.splitlines() == [
      f"checkpoint 4 in {checkpoints} has no manifest.sha256.json (saved before switch_jax "
      "wrote manifests); restoring it unverified"]


def test_a_save_whose_manifest_cannot_be_written_leaves_no_step(tmp_path, monkeypatch):
  # The manifest is part of the commit: when writing it fails, the step
  # stays a temporary directory, which no restore takes.
  checkpoints = _run(tmp_path, steps=(2,))

  def refuse(directory):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(integrity, "write_manifest", refuse)
  checkpointer = train_state.TrainCheckpointer(tmp_path / "run", keep=3, async_save=False)
  with pytest.raises(train_state.UserError, match=r"saving checkpoint 4 .* failed \(OSError: "
                     r"\[Errno 28\] No space left on device\); the last complete checkpoint is "
                     r"step 2, intact"):
    small.save(checkpointer, small.make(4))
  checkpointer.close()
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4.orbax-checkpoint-tmp"]
  monkeypatch.undo()
  step, _, _, _ = _restore(tmp_path)
  assert step == 2  # (orbax removes the temporary directory in the background)


def test_on_a_bucket_the_manifest_goes_up_before_the_commit_marker(emulator, monkeypatch):  # noqa: F811
  # A bucket has no rename: orbax writes the step in place and marks it
  # whole with commit_success.txt; the manifest must be there before it.
  run = "gs://bucket/manifest_run"
  seen = []
  original = integrity.write_manifest

  def watched(directory):
    seen.append((storage.path(directory) / "commit_success.txt").exists())
    return original(directory)

  monkeypatch.setattr(integrity, "write_manifest", watched)
  checkpointer = train_state.TrainCheckpointer(run, keep=3, async_save=False)
  small.save(checkpointer, small.make(2))
  checkpointer.close()
  step_dir = storage.path(run) / "checkpoints" / "2"
  assert seen == [False]  # written once, while the step had no commit marker
  assert (step_dir / "commit_success.txt").exists()
  assert integrity.verify(step_dir) is None
  checkpointer = train_state.TrainCheckpointer(run, keep=3)
  step, state, _, _ = checkpointer.restore_latest(small.abstract(small.make(0)))
  checkpointer.close()
  assert step == 2
  small.assert_equal(state, small.make(2))


def test_a_reader_of_one_step_checks_only_the_items_it_reads(tmp_path):
  # eval, export and fine-tuning read params/ and meta/ of one step.
  step_dir = _run(tmp_path) / "4"
  integrity.check_items(step_dir, ("params", "meta"))
  _flip(step_dir / "opt_state" / "_sharding", 10)  # not read by them: not their concern
  integrity.check_items(step_dir, ("params", "meta"))
  _flip(step_dir / "params" / "_sharding", 10)
  with pytest.raises(train_state.UserError, match=r"checkpoint .*/4 fails its manifest: "
                                                  r"params/_sharding does not match its sha256"):
    integrity.check_items(step_dir, ("params", "meta"))
  (step_dir / integrity.MANIFEST).unlink()  # saved before manifests: passes, unverified
  integrity.check_items(step_dir, ("params", "meta"))


def _two_processes(model_dir, phase, out):
  """Runs checkpoint_worker.py as both processes of one run; returns their output."""
  here = Path(__file__).resolve().parents[1]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
  procs = [subprocess.Popen([sys.executable, str(here / "checkpoint_worker.py"), str(i), port,
                             str(model_dir), phase, str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
  return logs


def test_on_two_hosts_a_damaged_step_is_set_aside_once_and_both_resume_from_the_one_before(
    tmp_path):
  # One shared MODEL_DIR: each host checking and moving the step itself
  # raced (the second move found nothing) and could leave the hosts on
  # different steps.
  run = tmp_path / "run"
  _two_processes(run, "save", tmp_path / "unused.json")
  step_4 = run / "checkpoints" / "4"
  manifest = json.loads((step_4 / integrity.MANIFEST).read_text())
  assert any("ocdbt.process_1/" in name for name in manifest["files"])  # both hosts' files
  victim = next(step_4 / name for name in sorted(manifest["files"])
                if name.startswith("params/ocdbt.process_1/"))
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0xFF
  victim.write_bytes(bytes(data))
  logs = _two_processes(run, "restore", tmp_path / "restored.json")
  restored = json.loads((tmp_path / "restored.json").read_text())
  assert restored == {"step": 2, "sum": float(np.arange(8 * 16).sum() * 2)}
  assert [p.name.split("-")[0] for p in (run / "checkpoints_unreadable").iterdir()] == ["4"]
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
  assert all("fails its manifest" in log for log in logs), logs


def test_loading_one_step_of_a_run_refuses_a_damaged_file_in_one_line(tmp_path):
  # eval, export and fine-tuning read one step (load_model, load_params),
  # with no earlier step to fall back to: a damaged file is named, not read.
  step_4 = _run(tmp_path) / "4"
  victim = next(p for p in sorted((step_4 / "params").rglob("*"))
                if p.is_file() and "/d/" in str(p))
  _flip(victim)
  with pytest.raises(UserError, match=r"fails its manifest: params/.* does not match"):
    model_format.load_model(step_4)
  with pytest.raises(UserError, match="fails its manifest"):
    model_format.load_params(tmp_path / "run", target=None)  # the run's newest step: 4
