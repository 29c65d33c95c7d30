"""Evaluation, inference and plotting, each against a direct computation.

One tiny Switch model with large random weights (so that outputs depend on
the input, and some sequences end in EOS while others run to the length
limit) and a hand-made byte-level seqio task serve every test. The task's
targets are built from an independent, unsharded `decoding.predict`, so
its exact-match score is known before the evaluator runs. The sharded
paths all decode [8, 16] inputs to 6 tokens on a (4, 2, 1) mesh, so the
decoder compiles once for the whole file.
"""

import json
import os
import struct

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from switch_jax import partitioning
from switch_jax.checkpoints import model_format
from switch_jax.cli import main as cli
from switch_jax.evaluation import decoding
from switch_jax.evaluation import evaluator, inference, teacher_forced
from switch_jax.model import losses
from switch_jax.cli import plots
from switch_jax.config import get_config
from switch_jax.data import vocabularies
from switch_jax.model.encoder_decoder import EncoderDecoder
from switch_jax.model.param_count import abstract_params

TASK = "test_evaluation_bytes"
MESH_SHAPE = (4, 2, 1)
BATCH = 8
LENGTHS = {"inputs": 16, "targets": 6}
VOCAB = seqio.ByteVocabulary()
TASK_INPUTS = ["abc", "hello", "xyz!", "q", "longer one", "zz"]
FILE_INPUTS = ["the cat sat", "7 + 7", "ok"]  # the longest pads to 16, like the task's
MATCHED = (0, 1, 3, 4)  # task examples whose target is the model's own prediction
_TARGETS: list = []


def _exact_match(targets, predictions):
  return {"exact_match": 100.0 * np.mean([t == p for t, p in zip(targets, predictions)])}


def _prediction_chars(targets, predictions):
  del targets
  return {"prediction_chars": float(np.mean([len(p) for p in predictions]))}


def _random_params(config, seed=0):
  """Normal weights with std sqrt(10 / fan_in), a sharpened output norm, and
  a 3x EOS embedding so that some rows (not all) end early."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if len(leaf.shape) == 1:
      return np.full(leaf.shape, 3.0 if "decoder_norm" in name else 1.0, np.float32)
    std = 1.0 if "embedding" in name else np.sqrt(10.0 / (np.prod(leaf.shape) / leaf.shape[-1]))
    return (rng.standard_normal(leaf.shape) * std).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(config)))
  params["token_embedder"]["embedding"][inference.EOS_ID] *= 3.0
  return params


def _encode(texts, length=LENGTHS["inputs"]):
  out = np.zeros((len(texts), length), np.int32)
  for i, text in enumerate(texts):
    ids = VOCAB.encode(text)[:length - 1] + [inference.EOS_ID]
    out[i, :len(ids)] = ids
  return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The model, its parameters (plain and on the mesh), a checkpoint of them,
  the reference decodes of every input, and the registered task."""
  # One sequence per routing group and room for every token: an example's
  # outputs do not depend on the rest of its batch.
  config = get_config("tiny_switch", vocab_size=264, group_size=None, eval_capacity_factor=4.0)
  model = EncoderDecoder(config)
  params = _random_params(config)
  reference = np.asarray(decoding.predict(
      model, params, {"encoder_input_tokens": _encode(TASK_INPUTS + FILE_INPUTS)},
      max_decode_length=LENGTHS["targets"]))
  ended = (reference == inference.EOS_ID).any(axis=1)
  assert ended.any() and not ended.all(), "the weights should end some rows early, not all"
  predictions = [VOCAB.decode(row.tolist()) for row in reference]
  _TARGETS[:] = [predictions[i] if i in MATCHED else f"not {predictions[i]}"
                 for i in range(len(TASK_INPUTS))]

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"inputs": TASK_INPUTS, "targets": _TARGETS})

  features = {"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB)}
  seqio.TaskRegistry.add(
      TASK, source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=features, metric_fns=[_exact_match, _prediction_chars])
  mesh = partitioning.make_mesh(MESH_SHAPE)
  sharded = jax.device_put(params, partitioning.logical_to_sharding(abstract_params(config), mesh))
  checkpoint = model_format.save_model(tmp_path_factory.mktemp("run") / "ckpt", config, params)
  yield dict(config=config, model=model, params=params, sharded=sharded, mesh=mesh,
             reference=reference, predictions=predictions, checkpoint=checkpoint)
  seqio.TaskRegistry.remove(TASK)


def _expected_task_metrics(predictions, count=len(TASK_INPUTS)):
  matched = sum(i in MATCHED for i in range(count))
  return {f"{TASK}/exact_match": 100.0 * matched / count,
          f"{TASK}/prediction_chars": float(np.mean([len(p) for p in predictions[:count]]))}


def _batch(inputs, targets):
  enc = _encode(inputs)
  tgt = np.zeros((len(targets), LENGTHS["targets"]), np.int32)
  for i, row in enumerate(targets):
    tgt[i, :len(row)] = row
  dec = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
          "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.int32)}


def test_eval_metrics_equal_direct_computation_with_a_padded_last_batch(setup):
  # 11 examples: a full batch of 8 and one of 3 padded with zero rows. The
  # first 6 targets are the greedy outputs, which teacher forcing predicts.
  inputs = TASK_INPUTS + FILE_INPUTS + ["extra", "another one"]
  rng = np.random.default_rng(1)
  targets = [inference.strip_after_eos(r) for r in setup["reference"][:6]]
  targets += [list(rng.integers(3, 259, n)) for n in (6, 3, 1, 5, 2)]
  full = _batch(inputs, targets)
  batches = [{k: v[:8] for k, v in full.items()}, {k: v[8:] for k, v in full.items()}]

  results = teacher_forced.eval_metrics(setup["model"], setup["sharded"], batches,
                                    mesh=setup["mesh"], batch_size=BATCH)

  # One unsharded call on all 11 rows (jitted: eager Flax is slower than compiling).
  logits = jax.jit(setup["model"].apply)(
      {"params": setup["params"]}, full["encoder_input_tokens"], full["decoder_input_tokens"],
      full["decoder_target_tokens"])
  weights = full["decoder_loss_weights"].astype(np.float32)
  nll, z = losses.cross_entropy(logits, full["decoder_target_tokens"], weights, 1e-4)
  tokens = weights.sum()
  correct = (np.argmax(logits, -1) == full["decoder_target_tokens"]) * weights
  assert results["num_tokens"] == tokens == sum(len(t) for t in targets)
  np.testing.assert_allclose(results["cross_entropy"], np.sum(nll) / tokens, rtol=1e-5)
  np.testing.assert_allclose(results["output_z_loss"], np.sum(z) / tokens, rtol=1e-5)
  np.testing.assert_allclose(results["accuracy"], correct.sum() / tokens, rtol=1e-6)
  assert results["accuracy"] > 0.3  # the greedy rows are right
  load = np.asarray(results["expert_load"])
  assert load.shape == (2, 4)  # a Switch layer in the encoder and one in the decoder
  np.testing.assert_allclose(load.sum(axis=1), 1.0, rtol=1e-4)


def test_inference_evaluator_scores_the_decoded_predictions(setup):
  task_evaluator = evaluator.InferenceEvaluator(
      setup["model"], TASK, mesh=setup["mesh"], batch_size=BATCH, task_feature_lengths=LENGTHS)
  assert [t.name for t in task_evaluator.eval_tasks] == [TASK]
  results = task_evaluator.evaluate(setup["sharded"], step=7)
  expected = _expected_task_metrics(setup["predictions"])
  assert results.keys() == expected.keys()
  for name, value in expected.items():
    assert results[name] == pytest.approx(value, rel=1e-9), name

  capped = evaluator.InferenceEvaluator(
      setup["model"], TASK, mesh=setup["mesh"], batch_size=BATCH, task_feature_lengths=LENGTHS,
      max_examples=3)
  assert capped.evaluate(setup["sharded"]) == pytest.approx(
      _expected_task_metrics(setup["predictions"], count=3))


def test_inference_evaluator_reads_tfds_mock_data(setup):
  """seqio.Evaluator alone fails on TFDS mock data (its tasks' in-memory
  cache asks for split sizes); the InferenceEvaluator reads past that."""
  toy_vocab = os.path.join(os.path.dirname(seqio.__file__), "test_data", "sentencepiece",
                           "sentencepiece.model")  # ships with seqio
  gin.bind_parameter("c4_vocabulary_path.path", toy_vocab)
  try:
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
      with pytest.raises(KeyError, match="splits"):
        seqio.Evaluator("super_glue_rte_v102", seqio.EncDecFeatureConverter(pack=False),
                        sequence_length=LENGTHS)
      task_evaluator = evaluator.InferenceEvaluator(
          setup["model"], "super_glue_rte_v102", mesh=setup["mesh"], batch_size=BATCH,
          task_feature_lengths=LENGTHS)
    # Read outside the mock: the examples were cached when it was built. A
    # random model never spells "entailment" or "not_entailment".
    assert task_evaluator.evaluate(setup["sharded"]) == {"super_glue_rte_v102/accuracy": 0.0}
  finally:
    gin.bind_parameter("c4_vocabulary_path.path", vocabularies.C4_VOCAB_PATH)


def _check_jsonl(path, setup):
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["input"] for r in records] == FILE_INPUTS
  reference = setup["reference"][len(TASK_INPUTS):]
  assert [r["tokens"] for r in records] == [inference.strip_after_eos(r) for r in reference]
  assert [r["prediction"] for r in records] == setup["predictions"][len(TASK_INPUTS):]


def test_infer_on_a_text_file_matches_decoding_predict(setup, tmp_path):
  inputs = tmp_path / "inputs.txt"
  inputs.write_text("\n".join(FILE_INPUTS) + "\n")
  out = tmp_path / "out" / "predictions.jsonl"
  written = inference.infer(checkpoint_path=str(setup["checkpoint"]), output_file=str(out),
                             input_file=str(inputs), vocabulary="byte", mesh_shape=MESH_SHAPE,
                             batch_size=BATCH, max_decode_length=LENGTHS["targets"])
  assert written == 3
  _check_jsonl(out, setup)
  assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.jsonl"]  # no temp left

  # The same run from gin: a file plus a --gin. binding.
  gin_file = tmp_path / "infer.gin"
  gin_file.write_text(f"infer.checkpoint_path = '{setup['checkpoint']}'\n"
                      f"infer.input_file = '{inputs}'\n"
                      "infer.vocabulary = 'byte'\n"
                      f"infer.mesh_shape = {MESH_SHAPE}\n"
                      f"infer.max_decode_length = {LENGTHS['targets']}\n")
  gin_out = tmp_path / "gin.jsonl"
  assert cli.main(["infer", f"--gin_file={gin_file}", f"--gin.infer.output_file='{gin_out}'",
                   f"--batch_size={BATCH}"]) == 0
  _check_jsonl(gin_out, setup)
  gin.clear_config()


def test_eval_command_writes_decoded_and_teacher_forced_metrics(setup, tmp_path, capsys):
  out = tmp_path / "eval"
  assert cli.main(["eval", "--checkpoint", str(setup["checkpoint"]), "--task", TASK,
                   "--feature_lengths", "16,6", "--batch_size", str(BATCH),
                   "--mesh_shape", "4,2,1", "--output_dir", str(out)]) == 0
  record = json.loads((out / "eval_results.json").read_text())
  assert record["task"] == TASK and record["split"] == "validation"
  metrics = record["metrics"]
  for name, value in _expected_task_metrics(setup["predictions"]).items():
    assert metrics[name] == pytest.approx(value, rel=1e-9), name
  # Targets are cut to 5 bytes and EOS appended: each counts min(bytes, 5) + 1.
  assert metrics["num_tokens"] == sum(min(len(VOCAB.encode(t)), 5) + 1 for t in _TARGETS)
  assert 0.0 < metrics["cross_entropy"] < 100.0
  printed = capsys.readouterr().out
  assert f"{TASK}/exact_match" in printed
  assert printed.splitlines()[0].split() == ["step", "none", "(a", "converted", "model)"]
  assert record["step"] is None and metrics["step"] is None


def test_eval_command_applies_model_config_bindings_to_the_checkpoints_config(setup, tmp_path):
  # The checkpoint holds room for every token; one slot per expert drops some.
  def dropped(*bindings):
    out = tmp_path / str(len(bindings))
    assert cli.main(["eval", "--checkpoint", str(setup["checkpoint"]), "--task", TASK,
                     "--feature_lengths", "16,6", "--batch_size", str(BATCH),
                     "--mesh_shape", "4,2,1", "--output_dir", str(out), *bindings]) == 0
    return json.loads((out / "eval_results.json").read_text())["metrics"]["fraction_dropped"]

  try:
    assert dropped() == 0.0
    assert dropped("--gin.ModelConfig.expert_capacity=1") > 0.2
  finally:
    gin.bind_parameter("ModelConfig.expert_capacity", None)  # the default, for later tests


@pytest.mark.parametrize("argv, message", [
    (["eval", "--checkpoint", "{missing}", "--task", TASK], "does not exist"),
    (["eval", "--task", TASK], "--checkpoint is required"),
    (["eval", "--checkpoint", "{missing}"], "--task is required"),
    (["infer", "--checkpoint", "{missing}", "--input_file", "{missing}", "--vocab", "byte",
      "--output", "{out}"], "does not exist"),
    (["infer", "--checkpoint", "{checkpoint}", "--input_file", "{missing}", "--vocab", "byte",
      "--output", "{out}"], "input file"),
    (["infer", "--checkpoint", "{checkpoint}", "--output", "{out}"], "--task NAME or --input_file"),
    (["infer", "--checkpoint", "{checkpoint}", "--task", TASK, "--output", "{out}",
      "--gin.no_such_function.x=1"], "gin: No configurable matching 'no_such_function'"),
])
def test_commands_fail_with_one_line(setup, tmp_path, capsys, argv, message):
  names = {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "o.jsonl"),
           "checkpoint": str(setup["checkpoint"])}
  assert cli.main([a.format(**names) for a in argv]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err, err
  assert not (tmp_path / "o.jsonl").exists()


MIXTURE = "test_evaluation_two_tasks"
MIXTURE_TASKS = {"test_evaluation_few": ["one", "two", "three"],
                 "test_evaluation_many": [f"example {i}" for i in range(10)]}


def _examples(targets, predictions):
  del predictions
  return {"examples": float(len(targets))}


@pytest.fixture(scope="module")
def mixture(setup):
  """Two tasks of 3 and 10 examples (targets = inputs) mixed at equal rates:
  seqio's mixed stream would stop once the small one runs out."""
  del setup  # registers the model's task first; the mixture reuses its checkpoint
  features = {"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB)}
  for name, texts in MIXTURE_TASKS.items():
    def dataset_fn(split, shuffle_files, seed=None, texts=texts):
      del split, shuffle_files, seed
      return tf.data.Dataset.from_tensor_slices({"inputs": texts, "targets": texts})
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=features, metric_fns=[_examples, _exact_match])
  seqio.MixtureRegistry.add(MIXTURE, [(name, 1.0) for name in MIXTURE_TASKS])
  # Targets cut to 5 bytes and EOS appended.
  yield {name: sum(min(len(VOCAB.encode(t)), 5) + 1 for t in texts)
         for name, texts in MIXTURE_TASKS.items()}
  seqio.MixtureRegistry.remove(MIXTURE)
  for name in MIXTURE_TASKS:
    seqio.TaskRegistry.remove(name)


def _training_run(setup, directory, step):
  """A training run's MODEL_DIR whose newest checkpoint is `step`."""
  import optax  # pylint: disable=import-outside-toplevel
  from switch_jax.checkpoints import train_state  # pylint: disable=import-outside-toplevel
  from switch_jax.training import train_step  # pylint: disable=import-outside-toplevel
  state = train_step.TrainState(np.int32(step), setup["params"],
                                optax.sgd(0.1).init(setup["params"]))
  checkpointer = train_state.TrainCheckpointer(directory, async_save=False)
  checkpointer.save(step, state, setup["config"], {"batches": step})
  checkpointer.close()
  return directory


def test_eval_of_a_mixture_scores_every_example_of_every_task(setup, mixture, tmp_path, capsys):
  run = _training_run(setup, tmp_path / "run", step=7)
  out = tmp_path / "eval"
  assert cli.main(["eval", "--checkpoint", str(run), "--task", MIXTURE,
                   "--feature_lengths", "16,6", "--batch_size", str(BATCH),
                   "--mesh_shape", "4,2,1", "--output_dir", str(out)]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].split() == ["step", "7"]
  record = json.loads((out / "eval_results.json").read_text())
  assert record["step"] == 7 and record["evaluated"] == str(run / "checkpoints" / "7")
  metrics = record["metrics"]
  # Teacher-forced: every target token of both tasks, and each task's own.
  assert metrics["num_tokens"] == sum(mixture.values()) == 14 + 60  # 4 + 4 + 6, 10 x 6
  few, many = MIXTURE_TASKS
  for name, tokens in mixture.items():
    assert metrics[f"{name}/teacher_forced/num_tokens"] == tokens, name
  pooled = sum(metrics[f"{n}/teacher_forced/cross_entropy"] * t for n, t in mixture.items())
  assert metrics["cross_entropy"] == pytest.approx(pooled / sum(mixture.values()), rel=1e-6)
  # Decoded: each task's every example, and the mean over tasks of their mean metric.
  assert (metrics[f"{few}/examples"], metrics[f"{many}/examples"]) == (3.0, 10.0)
  means = [(metrics[f"{n}/examples"] + metrics[f"{n}/exact_match"]) / 2 for n in MIXTURE_TASKS]
  assert metrics[f"{MIXTURE}/average"] == pytest.approx(np.mean(means))


def test_training_eval_of_a_mixture_reads_each_task(setup, mixture):
  from switch_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from switch_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  dataset = pipeline.DatasetConfig(MIXTURE, LENGTHS, split="validation", batch_size=BATCH)
  results = trainer._evaluate(setup["model"], setup["sharded"], dataset, setup["mesh"],
                              eval_steps=1)
  few, many = MIXTURE_TASKS
  # One batch per task: all 3 of the small one, the first 8 of the large one.
  eight = sum(min(len(VOCAB.encode(t)), 5) + 1 for t in MIXTURE_TASKS[many][:8])
  assert results[f"{few}/teacher_forced/num_tokens"] == mixture[few]
  assert results[f"{many}/teacher_forced/num_tokens"] == eight
  assert results["num_tokens"] == mixture[few] + eight


def test_train_and_eval_record_the_same_metric_names(setup):
  import functools  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from switch_jax import run_logging  # pylint: disable=import-outside-toplevel
  from switch_jax.training import train_step  # pylint: disable=import-outside-toplevel
  batch = _batch(TASK_INPUTS + FILE_INPUTS[:2], [[5, 6, 1]] * BATCH)
  optimizer = optax.sgd(0.1)
  state = train_step.TrainState(np.int32(0), setup["params"], optimizer.init(setup["params"]))
  step = functools.partial(train_step.train_step, model=setup["model"], optimizer=optimizer)
  shapes = jax.eval_shape(step, state, batch, jax.random.PRNGKey(0))[1]  # traced, not compiled
  metrics = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  train = set(run_logging.to_record(1, metrics, learning_rate=0.1, tokens=1.0,
                                    seconds_per_step=1.0))
  evaluated = set(teacher_forced.eval_metrics(setup["model"], setup["sharded"], [batch],
                                          mesh=setup["mesh"], batch_size=BATCH))
  shared = {"loss", "cross_entropy", "output_z_loss", "accuracy", "router_aux_loss",
            "router_z_loss", "router_aux_loss_unscaled", "router_z_loss_unscaled",
            "fraction_dropped", "router_confidence", "expert_load"}
  assert train - {"step", "learning_rate", "seconds_per_step", "tokens_per_second",
                  "grad_norm", "finite"} == shared
  assert evaluated - {"num_tokens"} == shared
  assert shared - {"expert_load"} <= set(run_logging.METRICS)


def test_strip_after_eos_keeps_tokens_through_eos_without_padding():
  assert inference.strip_after_eos(np.array([5, 1, 0, 0])) == [5, 1]
  assert inference.strip_after_eos([5, 1, 7, 1]) == [5, 1]
  assert inference.strip_after_eos([5, 0, 6]) == [5, 0, 6]
  assert inference.strip_after_eos([5, 6, 0, 0]) == [5, 6]
  assert inference.strip_after_eos([0, 0]) == []


def _png_size(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", data[16:24])


def test_plot_writes_loss_and_expert_load_pngs(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  lines = [{"split": "train", "step": s, "loss": 5.0 / s,
            "expert_load": [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]} for s in range(1, 6)]
  lines += [{"split": "eval", "step": s, "loss": 6.0 / s, "mix/average": 50.0,
             "few/teacher_forced/loss": 7.0 / s, "many/teacher_forced/loss": 5.0 / s,
             "many/teacher_forced/accuracy": 0.1} for s in (2, 4)]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn')
  out = tmp_path / "plots"
  assert cli.main(["plot", str(run), "--out", str(out)]) == 0
  assert capsys.readouterr().out.split() == [str(out / "loss.png"), str(out / "expert_load.png")]
  assert _png_size(out / "loss.png") == (700, 400)  # figsize 7 x 4 inches at 100 dpi
  assert _png_size(out / "expert_load.png") == (740, 520)  # 2 layers: 1 row of panels + heatmap
  # A mixture's eval records: one more loss line per task.
  assert plots._task_losses(lines) == {"few": "few/teacher_forced/loss",
                                       "many": "many/teacher_forced/loss"}
  assert cli.main(["plot", str(tmp_path / "nothing")]) == 2
  assert "no metrics.jsonl" in capsys.readouterr().err
