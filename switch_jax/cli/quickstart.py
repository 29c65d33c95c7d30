"""The quickstart: a small Switch model and its FLOP-matched dense baseline,
pretrained side by side with span corruption on the embedded corpus over an
emulated 8-device mesh, then compared on the validation split.

Both runs use the same gin run file, so they see the same batches for the
same number of steps; the dense model has one FFN where the Switch model
has its experts, so both spend the same FLOPs per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import gin
import jax
import numpy as np

from switch_jax import run_logging
from switch_jax.evaluation import decoding
from switch_jax.evaluation import inference, restore, teacher_forced
from switch_jax.cli import gin_config
from switch_jax.cli import plots as plotting
from switch_jax.data import corpus, pipeline

MODELS = (("switch", "quickstart/switch.gin"), ("dense", "quickstart/dense.gin"))
RUN_FILE = "quickstart/run.gin"


def train_both(output_dir: Path, bindings: Sequence[str] = (),
               models: Sequence[tuple[str, str]] = MODELS) -> dict:
  """Trains (or resumes) each model; returns {name: train summary}."""
  summaries = {}
  for name, model_file in models:
    print(f"\n=== {name} model ===", flush=True)
    gin_config.parse([model_file, RUN_FILE],
                     [f"MODEL_DIR = {str(output_dir / name)!r}", *bindings])
    (output_dir / name).mkdir(parents=True, exist_ok=True)
    (output_dir / name / "config.gin").write_text(gin.config_str())
    summaries[name] = gin.get_configurable("train")()
  return summaries


def _validation_set(batch_size=None) -> pipeline.DatasetConfig:
  """The run's validation split, unpacked, in order (gin must be parsed)."""
  return pipeline.DatasetConfig(
      gin_config.query("MIXTURE_OR_TASK_NAME/macro.value"),
      gin_config.query("TASK_FEATURE_LENGTHS/macro.value"), split="validation",
      batch_size=batch_size or gin_config.query("BATCH_SIZE/macro.value"), shuffle=False,
      pack=False, num_epochs=1)


def _restore(model_dir: Path, model_file: str, bindings: Sequence[str], mesh_shape=None):
  gin_config.parse([model_file, RUN_FILE], [f"MODEL_DIR = {str(model_dir)!r}", *bindings])
  model_config = gin.get_configurable("ModelConfig")()
  return restore.restore_for_eval(model_dir, model_config,
                                     mesh_shape or gin_config.query("train.mesh_shape"))


def validation_loss(model_dir: Path, model_file: str, bindings: Sequence[str]) -> dict:
  """Loss and accuracy over the whole validation split, eval mode."""
  model, params, mesh = _restore(model_dir, model_file, bindings)
  dataset = _validation_set()
  return teacher_forced.eval_metrics(model, params, pipeline.get_eval_batches(dataset),
                                     mesh=mesh, batch_size=dataset.batch_size)


def decoded_sample(model_dir: Path, model_file: str, bindings: Sequence[str]) -> dict:
  """One validation example: corrupted input, target spans, greedy prediction."""
  model, params, _ = _restore(model_dir, model_file, bindings, mesh_shape=(-1, 1, 1))
  params = jax.device_get(params)  # one example decodes on one device
  dataset = _validation_set(batch_size=8)
  batch = next(iter(pipeline.get_eval_batches(dataset)))
  vocab = pipeline.get_mixture_or_task(dataset.mixture_or_task_name).output_features[
      "targets"].vocabulary
  tokens = decoding.predict(model, params, {k: v[:1] for k, v in batch.items()}, method="greedy")
  text = lambda ids: vocab.decode([int(t) for t in inference.strip_after_eos(ids)])
  return {"input": text(batch["encoder_input_tokens"][0]),
          "target": text(batch["decoder_target_tokens"][0]),
          "prediction": text(np.asarray(tokens)[0])}


def run(output_dir: str, bindings: Sequence[str] = ()) -> dict:
  output_dir = Path(output_dir).absolute()
  built = corpus.embedded_corpus()
  print(f"Embedded corpus: {json.dumps(built.stats)} at {built.directory}", flush=True)
  train_both(output_dir, bindings)
  report = {name: validation_loss(output_dir / name, model_file, bindings)
            for name, model_file in MODELS}
  switch_records = run_logging.read_records(output_dir / "switch")
  sample = decoded_sample(output_dir / "switch", MODELS[0][1], bindings)
  plots = []
  for name, _ in MODELS:
    plots += plotting.write_plots(output_dir / name)
  summary = {
      "validation": report,
      "switch_expert_load": switch_records[-1].get("expert_load") if switch_records else None,
      "switch_expert_load_layers": (switch_records[-1].get("expert_load_layers")
                                    if switch_records else None),
      "sample": sample, "plots": [str(p) for p in plots], "output_dir": str(output_dir)}
  (output_dir / "quickstart.json").write_text(json.dumps(summary, indent=2, default=float))
  _print_summary(summary)
  return summary


def _print_summary(summary: dict) -> None:
  val = summary["validation"]
  print("\n=== Quickstart results (same data, steps and FLOPs per token) ===")
  for name in ("switch", "dense"):
    print(f"{name:>6}: validation loss {val[name]['cross_entropy']:.4f}, "
          f"accuracy {val[name]['accuracy']:.4f}")
  delta = val["dense"]["cross_entropy"] - val["switch"]["cross_entropy"]
  verdict = "ahead of" if delta > 0 else "behind"
  print(f"The Switch model is {abs(delta):.4f} nats {verdict} the dense model.")
  if summary["switch_expert_load"]:
    names = summary["switch_expert_load_layers"] or [
        str(i) for i in range(len(summary["switch_expert_load"]))]
    for name, load in zip(names, summary["switch_expert_load"]):
      print(f"Expert load, Switch layer {name}: " + " ".join(f"{x:.2f}" for x in load))
  sample = summary["sample"]
  print(f"Sample input:      {sample['input'][:300]}")
  print(f"Sample target:     {sample['target'][:300]}")
  print(f"Switch prediction: {sample['prediction'][:300]}")
  out = Path(summary["output_dir"])
  print(f"Checkpoints: {out}/{{switch,dense}}/checkpoints; metrics: {out}/{{switch,dense}}/"
        f"metrics.jsonl; plots: {', '.join(summary['plots'])}")
