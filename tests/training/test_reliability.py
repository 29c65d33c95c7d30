"""What a run guarantees: preemption saves, damaged checkpoints (per their
manifest) are set aside, a full disk stops the run in one line and the
restart resumes, non-finite steps are not applied, bad input fails before anything is
compiled or written, bfloat16 with a float32 router tracks float32, and a
run writes only where it is told to."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import numpy as np
import pytest

import small_disk
from switch_jax import run_logging
from switch_jax.cli import main as cli
from switch_jax.cli import gin_config
from switch_jax.errors import UserError

FILES = ["models/tiny_switch.gin", "runs/pretrain.gin", "mesh/cpu8.gin"]


def _bindings(corpus, model_dir, steps, **extra):
  root, vocab = corpus
  bindings = {
      "MODEL_DIR": f'"{model_dir}"', "MIXTURE_OR_TASK_NAME": '"local_span_corruption"',
      "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 8}", "TRAIN_STEPS": str(steps),
      "BATCH_SIZE": "8", "local_files.train": f'"{root / "train.txt"}"',
      "local_files.validation": f'"{root / "validation.txt"}"',
      "local_vocabulary_path.path": f'"{vocab}"', "ModelConfig.vocab_size": "256",
      "LoopConfig.log_period": "1", "EvalConfig.period": "1000", "CheckpointConfig.period": "2",
      "CheckpointConfig.async_save": "False", "make_optimizer.name": "'adam'",
      "rsqrt_schedule.warmup_steps": "10"}
  bindings.update(extra)
  return [f"{k} = {v}" for k, v in bindings.items()]


def _train(corpus, model_dir, steps, files=FILES, **extra):
  gin_config.parse(files, _bindings(corpus, model_dir, steps, **extra))
  return gin.get_configurable("train")()


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """A run trained to step 4 (checkpoints 2 and 4); copy it, don't change it."""
  run = tmp_path_factory.mktemp("trained") / "run"
  _train(corpus, run, 4)
  return run


def _copy(run: Path, to: Path) -> Path:
  shutil.copytree(run, to)
  return to


def _listing(root: Path) -> dict:
  """{relative path: sha256} of every file under root."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_sigterm_saves_the_current_step_exits_zero_and_wrote_only_model_dir_and_cache(
    corpus, tmp_path):
  # One subprocess shows both: the preemption save, and that a run (with its
  # save and its data and vocabulary caches) writes nowhere but MODEL_DIR and
  # the cache dir it is given: not HOME, not the working directory.
  home, work, cache = tmp_path / "home", tmp_path / "work", tmp_path / "cache"
  for d in (home, work, cache):
    d.mkdir()
  args = ["--num_cpu_devices=8", *[f"--gin_file={f}" for f in FILES],
          *[f"--gin.{b.replace(' = ', '=', 1)}" for b in _bindings(
              corpus, tmp_path / "run", 100000, **{"CheckpointConfig.period": "100000"})]]
  env = dict(os.environ, HOME=str(home), SWITCH_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
  proc = subprocess.Popen([sys.executable, "-m", "switch_jax.cli.main", "train", *args], env=env,
                          cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.monotonic() + 600
  while not (metrics.is_file() and len(run_logging.read_records(tmp_path / "run")) >= 3):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  sent = time.monotonic()
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-3000:]
  assert time.monotonic() - sent < 60  # promptly: one step and one save
  saved = [int(line.split()[4].rstrip(";")) for line in out.splitlines()
           if line.startswith("Preempted (SIGTERM): saved step")]
  assert len(saved) == 1 and saved[0] >= 3
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                if p.name.isdigit()) == [saved[0]]
  assert _listing(home) == {} and _listing(work) == {}


def _flip_a_byte(file: Path) -> None:
  data = bytearray(file.read_bytes())
  data[len(data) // 2] ^= 0xFF
  file.write_bytes(bytes(data))


def _read_by_the_restore(step_dir: Path) -> Path:
  """The root node of params/'s OCDBT tree (the one file in params/d/):
  every array's lookup starts there."""
  (node,) = (step_dir / "params" / "d").iterdir()
  return node


def _not_read_by_the_restore(step_dir: Path) -> Path:
  """process 0's own OCDBT manifest: a restore reads the merged tree from
  params/manifest.ocdbt and never opens this one (strace shows it), so
  without a manifest its damage went unseen."""
  return step_dir / "params" / "ocdbt.process_0" / "manifest.ocdbt"


@pytest.mark.parametrize("damaged", [_read_by_the_restore, _not_read_by_the_restore],
                         ids=["read_by_the_restore", "not_read_by_the_restore"])
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_used(corpus, trained, tmp_path,
                                                                     capsys, damaged):
  run = _copy(trained, tmp_path / "run")  # checkpoints 2 and 4
  # One byte of step 4 flipped, and a half-written step 6 left behind as a
  # killed save would. Before manifests, (a) failed the restore in
  # tensorstore and (b) resumed from step 4 without a word.
  victim = damaged(run / "checkpoints" / "4")
  _flip_a_byte(victim)
  damaged_bytes = victim.read_bytes()
  (run / "checkpoints" / "6.orbax-checkpoint-tmp-123").mkdir()
  capsys.readouterr()
  summary = _train(corpus, run, 6)
  out = capsys.readouterr().out
  warning = [line for line in out.splitlines() if line.startswith("WARNING: checkpoint 4 ")]
  assert len(warning) == 1, out[-3000:]
  relative = str(victim.relative_to(run / "checkpoints" / "4"))
  assert f"fails its manifest: {relative} does not match its sha256" in warning[0], warning
  resumed = [line for line in out.splitlines() if line.startswith("Resuming from")]
  assert resumed and resumed[0].endswith("at step 2"), resumed
  assert summary["step"] == 6
  kept = list((run / "checkpoints_unreadable").iterdir())
  assert len(kept) == 1 and kept[0].name.startswith("4-")  # set aside, never deleted
  assert (kept[0] / relative).read_bytes() == damaged_bytes  # as it was found
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 6 and 4 in steps  # step 4 saved again, from good state


def test_a_full_disk_stops_the_run_in_one_line_and_a_restart_resumes_from_the_last_step(
    corpus, trained, tmp_path, capsys):
  # checkpoints/ on a tmpfs with room for steps 2 and 4 and half another:
  # the save of step 6 fills it.
  run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
  shutil.copytree(trained, run, ignore=shutil.ignore_patterns("checkpoints"))
  step_kb = small_disk.used_kilobytes(trained / "checkpoints" / "4")
  with small_disk.mounted(checkpoints, 2 * step_kb + step_kb // 2):
    shutil.copytree(trained / "checkpoints", checkpoints, dirs_exist_ok=True)
    argv = ["train", *[f"--gin_file={f}" for f in FILES],
            *[f"--gin.{b.replace(' = ', '=', 1)}" for b in _bindings(corpus, run, 8)]]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    (error,) = [line for line in err.splitlines() if line.startswith("switch-jax train: error")]
    assert "In call to configurable" not in err, err[-3000:]  # gin's note: not for users
    # Where it fills (an array's data, a JSON item) decides the error's type.
    assert error.startswith(f"switch-jax train: error: saving checkpoint 6 in {checkpoints} "
                            "failed ("), error
    assert "No space left on device" in error
    assert "the last complete checkpoint is step 4, intact" in error
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "6.orbax-checkpoint-tmp"]
    small_disk.grow(checkpoints, 8 * step_kb)  # space is back (keep=3 holds 4 steps at a save)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"Resuming from {checkpoints / '4'} at step 4" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4", "6", "8"]  # keep=3


def test_non_finite_steps_are_skipped_then_the_run_stops(corpus, trained, tmp_path):
  run = _copy(trained, tmp_path / "run")  # good checkpoints at steps 2 and 4
  before = _listing(run / "checkpoints")
  # A learning rate of 1e30 sends the parameters to ~1e30 on step 5; every
  # step after that overflows.
  with pytest.raises(UserError, match=r"3 steps in a row had a non-finite loss.*checkpoint is "
                                      r"step 4"):
    _train(corpus, run, 50, **{"train.learning_rate": "@constant_schedule()",
                               "constant_schedule.value": "1e30",
                               "LoopConfig.max_nonfinite_steps": "3",
                               "CheckpointConfig.period": "1000"})
  events = run_logging.read_records(run, split="event")
  assert [e["step"] for e in events] == [6, 7, 8]
  assert all(not np.isfinite(e["loss"]) or not np.isfinite(e["grad_norm"]) for e in events)
  assert len(events[0]["router_max_abs_logit_per_layer"]) == 2  # one per Switch layer
  assert _listing(run / "checkpoints") == before  # nothing saved over the good ones


BAD_INPUTS = [
    ("bad gin syntax", ["ModelConfig.d_model = ("], "gin:"),
    ("unknown binding", ["ModelConfig.num_expert = 8"], "num_expert"),
    ("unknown task", ['MIXTURE_OR_TASK_NAME = "c4_span_coruption"'], "did you mean"),
    ("model vocabulary too small", ["ModelConfig.vocab_size = 128"],
     "ids but the model embeds only 128 (ModelConfig.vocab_size)"),
    ("mesh does not fit", ["MESH_SHAPE = (3, 1, 1)"], "needs a multiple of 3 devices"),
    ("experts over too many shards", ["MESH_SHAPE = (1, 8, 1)"], "8 expert shards but the model"),
    ("batch does not divide", ["BATCH_SIZE = 12"], "batch size 12 cannot be split"),
    ("missing TFDS data", ['MIXTURE_OR_TASK_NAME = "super_glue_rte_v102"'], "is not prepared"),
]


@pytest.mark.parametrize("name,extra,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_fails_fast_and_leaves_model_dir_alone(corpus, trained, tmp_path, capsys, name,
                                                         extra, message):
  run = _copy(trained, tmp_path / "run")
  before = _listing(run)
  # SuperGLUE's vocabulary is T5's on gs://: offline, gcsfs takes ~45 s to
  # give it up (google-auth retrying the GCE metadata server). A local one
  # keeps this test about the data check.
  bindings = _bindings(corpus, run, 6, **{"c4_vocabulary_path.path": f'"{corpus[1]}"'}) + extra
  argv = ["train", *[f"--gin_file={f}" for f in FILES],
          *[f"--gin.{b.replace(' = ', '=', 1)}" for b in bindings],
          f"--tfds_data_dir={tmp_path / 'no_such_dir'}"]
  assert cli.main(argv) == 2, name
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err, err
  assert _listing(run) == before


@pytest.mark.parametrize("content,message", [
    (b"", "empty"), ("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e d\u00e9j\u00e0 vu\n".encode("latin-1") * 40,
                     "is not UTF-8")], ids=["empty", "latin-1"])
def test_empty_or_non_utf8_corpus_fails_fast(corpus, tmp_path, capsys, content, message):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(content)
  argv = ["train", *[f"--gin_file={f}" for f in FILES],
          *[f"--gin.{b.replace(' = ', '=', 1)}" for b in _bindings(
              corpus, tmp_path / "run", 4, **{"local_files.train": f'"{bad}"'})]]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err, err
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_bfloat16_with_a_float32_router_tracks_float32(corpus, tmp_path):
  losses = {}
  for precision, steps in (("float32", 16), ("bfloat16", 16), ("bfloat16_router", 3)):
    _train(corpus, tmp_path / precision, steps, files=FILES + [f"precision/{precision}.gin"],
           **{"CheckpointConfig.period": "1000", "rsqrt_schedule.base": "0.03"})
    losses[precision] = np.array([r["loss"] for r in run_logging.read_records(
        tmp_path / precision)])
  assert np.all(np.isfinite(losses["bfloat16"]))
  assert losses["float32"][-1] < 0.8 * losses["float32"][0]  # it learned
  # Selective precision follows the float32 curve (measured within 2%).
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.03)
  # The ablation (router in bfloat16) is available and runs.
  assert len(losses["bfloat16_router"]) == 3 and np.all(np.isfinite(losses["bfloat16_router"]))
