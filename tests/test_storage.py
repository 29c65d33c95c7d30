"""The file layer (switch_jax.storage) and the run logger on a bucket, against
the local Cloud Storage emulator: metrics go up in parts, each byte once;
what a crash loses is what was not synced; TensorBoard has one run per
split with the layer names in the tags and the config as text."""

import json
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from gcs_emulator import emulator  # noqa: F401  pylint: disable=unused-import  # the fixture
from switch_jax import run_logging, storage
from switch_jax.errors import UserError

# Switch-Base-128's expert load: 12 encoder + 12 decoder Switch layers x 128 experts.
LAYERS = [f"{side}_layer_{i}" for side in ("encoder", "decoder") for i in range(1, 24, 2)]
EXPERTS = 128


def _record(step: int, rng) -> dict:
  load = rng.dirichlet(np.ones(EXPERTS), size=len(LAYERS))
  return {"step": step, "loss": 3.0 - 0.01 * step, "accuracy": 0.5, "fraction_dropped": 0.01,
          "learning_rate": 0.01, "seconds_per_step": 0.5, "tokens_per_second": 1e5,
          run_logging.EXPERT_LOAD: np.round(load, 5).tolist(),
          run_logging.LAYER_NAMES_KEY: LAYERS}


def _line_bytes(record, split="train") -> int:
  return len((json.dumps({"split": split, **record}, sort_keys=True) + "\n").encode())


def test_metrics_go_to_a_bucket_in_parts_each_byte_once(emulator, tmp_path):  # noqa: F811
  rng = np.random.default_rng(0)
  run = "gs://bucket/parts_run"
  logger = run_logging.MetricsLogger(run, 100, tensorboard=False, stream=open(
      tmp_path / "console", "w"))
  records = [_record(step, rng) for step in range(1, 11)]
  for record in records[:5]:
    logger.write(record)
  logger.sync()  # what the trainer does after a checkpoint save
  for record in records[5:]:
    logger.write(record)
  logger.close()
  parts = [p.name for p in run_logging.metrics_files(run)]
  assert parts == ["metrics-00000.jsonl", "metrics-00001.jsonl"]
  assert [r["step"] for r in run_logging.read_records(run)] == list(range(1, 11))
  lines = [_line_bytes(r) for r in records]
  assert logger.uploaded_bytes == sum(lines)  # each line went up once
  # The old way rewrote the whole file at every log: the sum of its sizes.
  rewritten = sum(np.cumsum(lines))
  per_log = sum(lines) / len(lines)
  # 24 layers x 128 shares, 5 decimals: ~28 KB a line (the 14 KB had
  # shorter numbers); the part files add nothing to it.
  assert 20_000 < per_log < 32_000, per_log
  assert rewritten / logger.uploaded_bytes == pytest.approx((len(lines) + 1) / 2, rel=0.05)
  # 10,000 logs: ~0.28 GB uploaded now, against ~1.4 TB (n (n + 1) / 2 lines).
  assert per_log * 10_000 / 1e9 < 0.35
  assert per_log * 10_000 * 10_001 / 2 / 1e12 > 1.0


def test_a_crash_loses_only_what_was_not_synced(emulator, tmp_path):  # noqa: F811
  rng = np.random.default_rng(1)
  run = "gs://bucket/crash_run"
  logger = run_logging.MetricsLogger(run, 100, tensorboard=False, stream=open(
      tmp_path / "console", "w"))
  for step in range(1, 5):
    logger.write(_record(step, rng))
  logger.sync()  # checkpoint at step 4
  for step in range(5, 8):
    logger.write(_record(step, rng))
  del logger  # killed: no close, no sync
  assert [r["step"] for r in run_logging.read_records(run)] == [1, 2, 3, 4]
  # The resumed run (from checkpoint 4) logs 5.. again, into the next part.
  resumed = run_logging.MetricsLogger(run, 100, tensorboard=False, stream=open(
      tmp_path / "console", "w"))
  for step in range(5, 9):
    resumed.write(_record(step, rng))
  resumed.close()
  assert [p.name for p in run_logging.metrics_files(run)] == [
      "metrics-00000.jsonl", "metrics-00001.jsonl"]
  assert [r["step"] for r in run_logging.read_records(run)] == list(range(1, 9))


def events(run_dir) -> dict[str, dict]:
  """{run: {tag: [(step, kind)]}} of the event files under run_dir/tensorboard."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  runs = {}
  for run in sorted(epath.Path(run_dir, "tensorboard").iterdir()):
    tags = runs.setdefault(run.name, {})
    for file in sorted(run.iterdir()):
      for event in tf.compat.v1.train.summary_iterator(str(file)):
        for value in event.summary.value:
          kind = ("histogram" if value.HasField("histo") else "scalar"
                  if value.HasField("simple_value") else value.metadata.plugin_data.plugin_name)
          tags.setdefault(value.tag, []).append((event.step, kind))
  return runs


def download(run, local):
  """`run`'s tensorboard/ folder copied to `local` (tf's reader cannot reach
  the emulator); returns `local`."""
  for file in storage.files(storage.path(run) / "tensorboard"):
    target = local / str(file.relative_to(storage.path(run)))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(file.read_bytes())
  return local


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_tensorboard_one_run_per_split_layer_names_in_tags(emulator, tmp_path, where):  # noqa: F811
  rng = np.random.default_rng(2)
  run = str(tmp_path / "run") if where == "local" else f"gs://bucket/tb_{tmp_path.name}"
  storage.write_atomically(storage.path(run) / "config.gin",
                           "ModelConfig.num_experts = 128\nLoopConfig.log_period = 100\n")
  logger = run_logging.MetricsLogger(run, 100, stream=open(tmp_path / "console", "w"))
  for step in (1, 2):
    logger.write(_record(step, rng))
  logger.sync()
  logger.write(_record(3, rng))
  logger.write({"step": 3, "loss": 2.5, "cross_entropy": 2.4,
                run_logging.EXPERT_LOAD: _record(3, rng)[run_logging.EXPERT_LOAD]}, "eval")
  logger.close()
  runs = events(download(run, tmp_path / "downloaded"))
  assert sorted(runs) == ["eval", "train"]  # 2 splits: 2 runs (not 1 + 24 x 128)
  train, evals = runs["train"], runs["eval"]
  assert [s for s, _ in train["loss"]] == [1, 2, 3]
  assert train["expert_load/encoder_layer_1"] == [(1, "histogram"), (2, "histogram"),
                                                  (3, "histogram")]
  assert {f"expert_load/{name}" for name in LAYERS} <= set(train)
  assert train["expert_load_max/decoder_layer_23"][0][1] == "scalar"
  # tensorboardX names a text summary TAG/text_summary
  assert train["config.gin/text_summary"] == [(0, "text")]
  assert train["hparams/text_summary"] == [(0, "text")]
  # An eval record has no layer names: the train records' are used.
  assert "expert_load/decoder_layer_23" in evals and evals["loss"] == [(3, "scalar")]
  assert not any("expert_" in tag.split("/")[-1] for tag in train)  # no tag per expert


def test_storage_on_a_bucket(emulator):  # noqa: F811
  file = "gs://bucket/store/a/b.txt"
  storage.write_atomically(file, "hello\n")
  assert storage.check(file, "file", kind="file").read_text() == "hello\n"
  assert storage.is_there("gs://bucket/store/a", "dir", "dir")
  with pytest.raises(UserError, match="examples gs://bucket/store/none does not exist"):
    storage.check("gs://bucket/store/none", "examples", kind="file")
  # A directory uploaded whole, its marker last; a failed block writes nothing.
  with storage.staged_directory("gs://bucket/store/model", "metadata.json") as tmp:
    (tmp / "params").mkdir()
    (tmp / "params" / "x").write_text("1")
    (tmp / "metadata.json").write_text("{}")
  assert [str(p) for p in storage.files("gs://bucket/store/model")] == [
      "gs://bucket/store/model/metadata.json", "gs://bucket/store/model/params/x"]
  with pytest.raises(UserError, match="not empty"):
    with storage.staged_directory("gs://bucket/store/model", "metadata.json"):
      pass
  with pytest.raises(RuntimeError):
    with storage.staged_directory("gs://bucket/store/failed", "metadata.json") as tmp:
      (tmp / "metadata.json").write_text("{}")
      raise RuntimeError("conversion failed")
  assert not storage.is_there("gs://bucket/store/failed", "dir", "any")
  with storage.local_copy("gs://bucket/store/model") as local:
    assert (local / "params" / "x").read_text() == "1" and not storage.is_bucket(local)


def test_a_failed_upload_is_reported_and_kept_for_the_next_sync(emulator, tmp_path):  # noqa: F811
  console = tmp_path / "console"
  logger = run_logging.MetricsLogger("gs://no-such-bucket/run", 10, tensorboard=False,
                                     stream=open(console, "w"))
  logger.write(_record(1, np.random.default_rng(3)))
  assert not logger.sync()
  logger.stream.flush()
  assert "WARNING: metrics not uploaded to gs://no-such-bucket/run" in console.read_text()
  assert json.loads(open(logger.path, encoding="utf-8").readline())["step"] == 1
  assert logger.uploaded_bytes == 0


def test_the_tensorboard_writer_is_imported_without_torch_and_leaves_it_importable():
  # tensorboardX imports torch when it is installed (1.4 s of its 1.5 s).
  code = ("import sys; from switch_jax import run_logging; "
          "run_logging._summary_writer_class(); assert 'torch' not in sys.modules; "
          "import importlib.util; assert sys.modules.get('torch', 0) is not None; "
          "print(importlib.util.find_spec('torch') is not None)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() in ("True", "False")
