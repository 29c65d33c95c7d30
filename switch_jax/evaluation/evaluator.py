"""Evaluating a checkpoint: teacher-forced metrics, task metrics on decoded
outputs (`seqio.Evaluator`), and inference to JSON lines.

    evaluate(checkpoint_path="/runs/rte", dataset=DatasetConfig(
        "super_glue_rte_v102", {"inputs": 512, "targets": 8}, split="validation"))
    # {"loss": ..., "accuracy": ..., "num_tokens": ...,   teacher-forced
    #  "super_glue_rte_v102/accuracy": ...}               decoded, per task

Everything runs on the `('data', 'expert', 'model')` mesh: parameters are
restored onto their shardings, batches split over the batch axes. Short
batches are padded with all-zero rows, so each function compiles once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from switch_jax import partitioning, run_logging
from switch_jax.checkpoints import model_format
from switch_jax.evaluation import decoding
from switch_jax.checkpoints import train_state
from switch_jax.training import train_step
from switch_jax.config import ModelConfig
from switch_jax.data import pipeline, sources, vocabularies
from switch_jax.errors import UserError
from switch_jax.model.encoder_decoder import EncoderDecoder
from switch_jax.model.param_count import abstract_params

EOS_ID = 1
_BATCH_FEATURES = train_step.MODEL_INPUTS + ("decoder_loss_weights",)


def restore_params(checkpoint_path, model: EncoderDecoder, mesh: Mesh):
  """The checkpoint's parameters, each written straight onto its shards."""
  boxed = abstract_params(model.config)
  target = train_state.abstract_like(nn.unbox(boxed),
                                           partitioning.logical_to_sharding(boxed, mesh))
  return train_state.load_params(checkpoint_path, target)


def _pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Appends all-zero rows up to `rows`; zero rows carry no loss weight."""
  have = next(iter(batch.values())).shape[0]
  return {k: np.pad(v, [(0, rows - have)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def _in_step(batches: Iterable[Mapping[str, np.ndarray]]) -> Iterator[Optional[dict]]:
  """Each host's batches, then None (for an all-zero batch) until every host
  has run out: hosts' shards can differ in length, but every step needs all."""
  iterator = iter(batches)
  while True:
    batch = next(iterator, None)
    if jax.process_count() == 1:
      if batch is None:
        return
    elif not np.any(multihost_utils.process_allgather(np.array(batch is not None))):
      return
    yield batch


@functools.lru_cache(maxsize=8)
def _weighted_eval_step(model: EncoderDecoder, mesh: Mesh):
  """Jitted `(params, batch) -> {metric: value * real target tokens}`."""

  def step(params, batch):
    metrics = train_step.eval_step(params, batch, model=model)
    tokens = metrics.pop("num_tokens")
    weighted = {k: v * tokens for k, v in metrics.items()}
    weighted["num_tokens"] = tokens
    return weighted

  return jax.jit(step, out_shardings=partitioning.replicated(mesh))


def eval_metrics(model: EncoderDecoder, params, batches: Iterable[Mapping[str, np.ndarray]],
                 *, mesh: Mesh, batch_size: int) -> dict:
  """Teacher-forced validation metrics, averaged over real target tokens.

  Args:
    model: the model, run deterministically (eval expert capacity).
    params: its parameters, on `mesh`.
    batches: host-local batches {feature: <int32>[batch_size / hosts, L]}
      (`pipeline.get_eval_batches`); a short one is padded with zero rows.
    mesh: the device mesh.
    batch_size: rows of a global batch.

  Returns:
    {name: float} of `run_logging.METRICS` (the names training records),
    weighted by each batch's real target tokens, 'num_tokens' (their total),
    and for a Switch model 'expert_load' ([layers][experts] token fractions).
  """
  multiple = math.lcm(mesh.shape["data"] * mesh.shape["expert"], jax.process_count())
  if batch_size % multiple:
    raise UserError(f"eval batch size {batch_size} does not split over the mesh's batch "
                    f"shards and the hosts; use a multiple of {multiple}")
  rows = batch_size // jax.process_count()
  step = _weighted_eval_step(model, mesh)
  sharding = partitioning.batch_sharding(mesh)
  outputs, template = [], None
  with jax.set_mesh(mesh):
    for batch in _in_step(batches):
      if batch is not None:
        template = batch = _pad_rows({k: batch[k] for k in _BATCH_FEATURES if k in batch}, rows)
      elif template is None:
        raise UserError("this host's shard of the eval data is empty; use fewer hosts or "
                        "more eval examples")
      else:
        batch = {k: np.zeros_like(v) for k, v in template.items()}
      outputs.append(step(params, {k: jax.make_array_from_process_local_data(sharding, v)
                                   for k, v in batch.items()}))
  if not outputs:
    raise UserError("the eval data holds no examples")
  sums = jax.tree.map(lambda *xs: np.sum(np.stack(xs), axis=0, dtype=np.float64),
                      *[jax.device_get(o) for o in outputs])
  tokens = float(sums.pop("num_tokens"))
  means = {name: total / max(tokens, 1.0) for name, total in sums.items()}
  results = {**run_logging.scalars(means), "num_tokens": tokens}
  load = run_logging.expert_load(means, decimals=6)
  if load is not None:
    results[run_logging.EXPERT_LOAD] = load
  return results


def _eval_tasks(dataset: pipeline.DatasetConfig) -> tuple[bool, list[seqio.Task]]:
  """(whether the name is a mixture, its tasks that have the split)."""
  provider = pipeline.get_mixture_or_task(dataset.mixture_or_task_name)
  tasks = [t for t in seqio.get_subtasks(provider) if dataset.split in t.splits]
  if not tasks:
    raise UserError(f"{dataset.mixture_or_task_name} has no split {dataset.split!r}")
  return isinstance(provider, seqio.Mixture), tasks


def _pooled(per_task: Sequence[Mapping]) -> dict:
  """The metrics of several tasks' tokens taken together: each task's
  means weighted by its target tokens."""
  if len(per_task) == 1:
    return dict(per_task[0])
  tokens = [r["num_tokens"] for r in per_task]
  total = sum(tokens)
  pooled = {"num_tokens": total}
  for name in per_task[0]:
    if name != "num_tokens" and all(name in r for r in per_task):
      mean = sum(np.asarray(r[name]) * n for r, n in zip(per_task, tokens)) / max(total, 1.0)
      pooled[name] = np.round(mean, 6).tolist() if np.ndim(mean) else float(mean)
  return pooled


def eval_dataset_metrics(model: EncoderDecoder, params, dataset: pipeline.DatasetConfig, *,
                         mesh: Mesh, max_batches: Optional[int] = None) -> dict:
  """Teacher-forced metrics of `dataset`'s split, one task at a time.

  A seqio mixture's stream ends when its first task runs out, so a mixture
  is read task by task (as t5x evaluates one), each task whole or up to
  `max_batches` batches.

  Returns:
    `eval_metrics`' names over the tokens of every task together; for a
    mixture also "<task>/teacher_forced/<name>" of each task's scalars.
  """
  is_mixture, tasks = _eval_tasks(dataset)
  per_task = {}
  for task in tasks:
    task_dataset = dataclasses.replace(dataset, mixture_or_task_name=task.name)
    batches = pipeline.get_eval_batches(task_dataset, jax.process_index(), jax.process_count())
    try:
      per_task[task.name] = eval_metrics(model, params, itertools.islice(batches, max_batches),
                                         mesh=mesh, batch_size=dataset.batch_size)
    except UserError as e:
      raise UserError(f"{task.name}: {e}") from None
  results = _pooled(list(per_task.values()))
  if is_mixture:
    for name, metrics in per_task.items():
      results.update({run_logging.task_metric(name, k): v for k, v in metrics.items()
                      if isinstance(v, float)})
  return results


def _zero_after_eos(tokens: np.ndarray, eos_id: int = EOS_ID) -> np.ndarray:
  """<int32>[N, L] with every token after each row's first EOS set to 0."""
  ended = np.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id) > 0
  return np.where(ended, 0, tokens).astype(np.int32)


def strip_after_eos(row: Sequence[int], eos_id: int = EOS_ID) -> list[int]:
  """The tokens up to and including the first EOS, trailing padding (0) dropped."""
  row = [int(t) for t in row]
  row = row[:row.index(eos_id) + 1] if eos_id in row else row
  while row and row[-1] == 0:
    row.pop()
  return row


def _global(batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """A batch every host holds whole, as one array split over the batch axes."""
  return jax.make_array_from_callback(batch.shape, partitioning.batch_sharding(mesh),
                                      lambda index: batch[index])


def decode_tokens(model: EncoderDecoder, params, inputs: np.ndarray, *, mesh: Mesh,
                  batch_size: int, max_decode_length: int, decode: str = "greedy",
                  beam_size: int = 4, alpha: float = 0.6) -> np.ndarray:
  """Decodes <int32>[N, Le] encoder inputs -> <int32>[N, L], 0 after EOS.

  Every host passes the same `inputs`; batches of `batch_size` (rounded up
  to split over the batch shards) are padded with zero rows.
  """
  shards = mesh.shape["data"] * mesh.shape["expert"]
  rows = -(-batch_size // shards) * shards
  out = []
  with jax.set_mesh(mesh):
    for start in range(0, len(inputs), rows):
      chunk = inputs[start:start + rows]
      batch = {"encoder_input_tokens": _global(_pad_rows({"x": chunk}, rows)["x"], mesh)}
      tokens = decoding.predict(model, params, batch, method=decode, beam_size=beam_size,
                                alpha=alpha, max_decode_length=max_decode_length, eos_id=EOS_ID)
      if not tokens.is_fully_addressable:
        tokens = multihost_utils.process_allgather(tokens, tiled=True)
      out.append(np.asarray(tokens)[:len(chunk)])
  if not out:
    return np.zeros((0, max_decode_length), np.int32)
  return _zero_after_eos(np.concatenate(out))


@contextlib.contextmanager
def _no_in_memory_cache(tasks: Sequence[seqio.Task]):
  """Makes `Task.get_dataset` skip its in-memory cache while seqio.Evaluator
  reads. That cache asks the source for split sizes, which TFDS mock data
  (tests) does not have, and the Evaluator caches the examples itself."""
  for task in tasks:
    task.get_dataset = functools.partial(type(task).get_dataset, task, try_in_mem_cache=False)
  try:
    yield
  finally:
    for task in tasks:
      vars(task).pop("get_dataset", None)


class InferenceEvaluator:
  """Scores a task's (or mixture's) eval split with the tasks' metric functions.

  A mixture is scored task by task, each task's split whole (seqio's
  Evaluator reads its tasks one by one). Every host decodes the whole eval
  set (seqio caches it on each). Tasks
  without metrics or the split are skipped; metrics on scores or auxiliary
  values are not supported.
  """

  def __init__(self, model: EncoderDecoder, mixture_or_task_name: str, *, mesh: Mesh,
               batch_size: int = 32, split: str = "validation",
               task_feature_lengths: Optional[Mapping[str, int]] = None,
               decode: str = "greedy", beam_size: int = 4, alpha: float = 0.6,
               max_examples: Optional[int] = None, tfds_data_dir: Optional[str] = None):
    """`task_feature_lengths` None sizes inputs and targets to the longest
    example; `max_examples` caps the examples read per task."""
    _check_decode(decode)
    self.model, self.mesh, self.batch_size = model, mesh, batch_size
    self._decode = dict(decode=decode, beam_size=beam_size, alpha=alpha)
    provider = pipeline.get_mixture_or_task(mixture_or_task_name)
    self._name, self._is_mixture = mixture_or_task_name, isinstance(provider, seqio.Mixture)
    tasks = seqio.get_subtasks(provider)
    sources.use_tfds_data_dir(tasks, sources.explicit_tfds_data_dir(tfds_data_dir))
    lengths = dict(task_feature_lengths) if task_feature_lengths else None
    with _no_in_memory_cache(tasks):
      try:
        self._evaluator = seqio.Evaluator(
            mixture_or_task_name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
            eval_split=split, sequence_length=lengths, num_examples=max_examples,
            logger_cls=(), async_compute_metrics=False)
      except ValueError as e:
        if isinstance(e, UserError) or "sequence_length" not in str(e):
          raise
        raise UserError(f"{e} (set the task feature lengths)") from None
    unsupported = [t.name for t in self.eval_tasks
                   if t.score_metric_fns or t.predict_with_aux_metric_fns]
    if unsupported:
      raise UserError(f"{', '.join(unsupported)}: only metrics on predictions are supported")

  @property
  def eval_tasks(self) -> Sequence[seqio.Task]:
    """The tasks that have the split and metrics."""
    return self._evaluator.eval_tasks

  def predict(self, params, ds) -> list[tuple[int, np.ndarray]]:
    """seqio's predict_fn: (index, features) examples -> [(index, <int32>[L])].

    Rows keep their full length, 0 after EOS: seqio stacks them into one
    array, and `Vocabulary.decode` stops at EOS.
    """
    examples = list(ds.as_numpy_iterator())
    inputs = np.stack([features["encoder_input_tokens"] for _, features in examples])
    length = self._evaluator.model_feature_shapes["decoder_target_tokens"][0]
    tokens = decode_tokens(self.model, params, inputs, mesh=self.mesh,
                           batch_size=self.batch_size, max_decode_length=length, **self._decode)
    return [(int(index), row) for (index, _), row in zip(examples, tokens)]

  def evaluate(self, params, step: Optional[int] = None) -> dict[str, float]:
    """{"task/metric": value} of every eval task, and for a mixture whose
    tasks have metrics "<mixture>/average": the mean over its tasks of each
    task's mean metric (GLUE's and SuperGLUE's average score); {} when no
    task has metrics."""
    if not self.eval_tasks:
      return {}
    future, _ = self._evaluator.evaluate(
        compute_metrics=True, step=step, predict_fn=functools.partial(self.predict, params))
    flat, task_means = {}, []
    for task, metrics in future.result().items():
      values = []
      for name, value in metrics.items():
        with contextlib.suppress(TypeError, ValueError):  # skips text and image metrics
          values.append(float(getattr(value, "value", value)))
          flat[f"{task}/{name}"] = values[-1]
      if values:
        task_means.append(float(np.mean(values)))
    if self._is_mixture and task_means:
      flat[f"{self._name}/average"] = float(np.mean(task_means))
    return flat


def _write_atomically(path: Path, text: str) -> None:
  """Readers see the old file or the whole new one, never a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  tmp.replace(path)


def _check_decode(decode: str) -> None:
  if decode not in ("greedy", "beam"):
    raise UserError(f"decode must be 'greedy' or 'beam', got {decode!r}")


def _check_checkpoint(checkpoint_path) -> None:
  """Fails before any data is read if no model is there (the one resolver)."""
  model_format.resolve(checkpoint_path)


def restore_for_eval(checkpoint_path, model_config: Optional[ModelConfig] = None,
                     mesh_shape=(-1, 1, 1), batch_size: Optional[int] = None,
                     model_overrides: Optional[Mapping[str, Any]] = None):
  """(model, params on the mesh, mesh) of a model checkpoint or training run;
  `model_config` None reads the checkpoint's, with the fields in
  `model_overrides` replaced (e.g. {"eval_capacity_factor": 4.0})."""
  _check_checkpoint(checkpoint_path)
  config = model_config or train_state.load_config(checkpoint_path)
  if model_overrides:
    try:
      config = config.replace(**model_overrides)
    except TypeError as e:  # a name that is no ModelConfig field
      raise UserError(f"ModelConfig overrides {dict(model_overrides)}: {e}") from None
  mesh = partitioning.make_mesh(mesh_shape)
  partitioning.check_fits(config, partitioning.mesh_shape(mesh), batch_size)
  model = EncoderDecoder(config)
  return model, restore_params(checkpoint_path, model, mesh), mesh


def evaluate(*, checkpoint_path: str, dataset: Optional[pipeline.DatasetConfig] = None,
             model_config: Optional[ModelConfig] = None,
             model_overrides: Optional[Mapping[str, Any]] = None, mesh_shape=(-1, 1, 1),
             decode: str = "greedy", beam_size: int = 4, alpha: float = 0.6,
             max_examples: Optional[int] = None, output_dir: Optional[str] = None) -> dict:
  """`switch-jax eval`: teacher-forced metrics on `dataset`'s split, and the
  task metrics on decoded outputs when its tasks define any. A mixture is
  evaluated task by task, and reported per task and over all of them.

  Args:
    checkpoint_path: a model checkpoint (`switch-jax convert`), a training
      run's model dir (its newest step) or one step directory.
    dataset: task or mixture, split, feature lengths and global batch size.
    model_config: None reads the checkpoint's.
    model_overrides: fields of the checkpoint's config to replace, e.g. the
      eval capacity factors (`--gin.ModelConfig.NAME=VALUE` on the command).
    mesh_shape: (data, expert, model); one -1 takes the remaining devices.
    decode, beam_size, alpha: how task metrics decode ('greedy' or 'beam').
    max_examples: read at most this many examples per task (rounded up to a
      whole batch for the teacher-forced metrics); None reads whole splits.
    output_dir: where to write `eval_results.json` (process 0).

  Returns:
    {"step": the training step evaluated (None for a converted model),
     metric: value}: see `eval_dataset_metrics` and `InferenceEvaluator`.
  """
  if dataset is None:
    raise UserError("evaluate needs a dataset (e.g. --task NAME, or the gin binding "
                    "evaluate.dataset = @DatasetConfig())")
  # Resolved once: a run still training may save a newer step meanwhile.
  source = model_format.resolve(checkpoint_path)
  model, params, mesh = restore_for_eval(str(source.path), model_config, mesh_shape,
                                         dataset.batch_size, model_overrides)
  results = {"step": source.step}
  results |= eval_dataset_metrics(
      model, params, dataset, mesh=mesh,
      max_batches=math.ceil(max_examples / dataset.batch_size) if max_examples else None)
  evaluator = InferenceEvaluator(
      model, dataset.mixture_or_task_name, mesh=mesh, batch_size=dataset.batch_size,
      split=dataset.split, task_feature_lengths=dataset.task_feature_lengths, decode=decode,
      beam_size=beam_size, alpha=alpha, max_examples=max_examples,
      tfds_data_dir=dataset.tfds_data_dir)
  results.update(evaluator.evaluate(params))
  if output_dir and jax.process_index() == 0:
    record = {"checkpoint": str(checkpoint_path), "evaluated": str(source.path),
              "step": source.step, "task": dataset.mixture_or_task_name,
              "split": dataset.split, "decode": decode, "metrics": results}
    _write_atomically(Path(output_dir) / "eval_results.json",
                      json.dumps(record, indent=2, sort_keys=True) + "\n")
  return results


def _vocabulary(vocabulary: Union[str, seqio.Vocabulary, None]) -> Optional[seqio.Vocabulary]:
  """'byte', a SentencePiece model path, or a vocabulary object as is."""
  if vocabulary is None or isinstance(vocabulary, seqio.Vocabulary):
    return vocabulary
  return seqio.ByteVocabulary() if vocabulary == "byte" else vocabularies.load_vocabulary(
      vocabulary)


def _task_examples(dataset: pipeline.DatasetConfig, max_examples: Optional[int]):
  """[{"input", "target"}] and token rows of the split, per task in order."""
  provider = pipeline.get_mixture_or_task(dataset.mixture_or_task_name)
  tasks = [t for t in seqio.get_subtasks(provider) if dataset.split in t.splits]
  if not tasks:
    raise UserError(f"{dataset.mixture_or_task_name} has no split {dataset.split!r}")
  sources.use_tfds_data_dir(tasks, sources.explicit_tfds_data_dir(dataset.tfds_data_dir))
  records, rows = [], []
  for task in tasks:
    vocab = task.output_features["inputs"].vocabulary
    ds = task.get_dataset(dict(dataset.task_feature_lengths), split=dataset.split,
                          shuffle=False, num_epochs=1, try_in_mem_cache=False)
    for ex in itertools.islice(ds.as_numpy_iterator(), max_examples):
      text = ex.get("inputs_pretokenized")
      record = {"input": vocab.decode(ex["inputs"]) if text is None else text.decode()}
      if "targets_pretokenized" in ex:
        record["target"] = ex["targets_pretokenized"].decode()
      records.append(record)
      rows.append(ex["inputs"][:dataset.task_feature_lengths["inputs"]])
  return records, rows


def _file_examples(input_file, vocab: seqio.Vocabulary, input_length: int):
  """[{"input"}] and token rows, each cut to `input_length` with EOS last."""
  path = Path(input_file)
  if not path.is_file():
    raise UserError(f"input file {input_file} does not exist")
  try:
    texts = path.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise UserError(f"{input_file} is not UTF-8 text ({e.reason})") from None
  if not texts:
    raise UserError(f"input file {input_file} is empty")
  return ([{"input": t} for t in texts],
          [list(vocab.encode(t))[:input_length - 1] + [EOS_ID] for t in texts])


def infer(*, checkpoint_path: str, output_file: str,
          dataset: Optional[pipeline.DatasetConfig] = None, input_file: Optional[str] = None,
          vocabulary: Union[str, seqio.Vocabulary, None] = None,
          model_config: Optional[ModelConfig] = None,
          model_overrides: Optional[Mapping[str, Any]] = None, mesh_shape=(-1, 1, 1),
          decode: str = "greedy", beam_size: int = 4, alpha: float = 0.6,
          batch_size: Optional[int] = None, input_length: int = 512,
          max_decode_length: Optional[int] = None, max_examples: Optional[int] = None) -> int:
  """`switch-jax infer`: decodes inputs into JSON lines, in order, of
  {"input", "prediction", "tokens"} (and "target" for a task's examples).

  Inputs are `dataset`'s split, or `input_file` (one per line, tokenized
  with `vocabulary`: 'byte', a SentencePiece model path or a seqio
  vocabulary; default the dataset's). Lengths default to the dataset's,
  else `input_length` and 64 tokens; `batch_size` to the dataset's, else 8.
  Returns the number of lines written.
  """
  if dataset is None and input_file is None:
    raise UserError("infer needs a task (--task / infer.dataset) or an --input_file")
  _check_checkpoint(checkpoint_path)
  _check_decode(decode)
  vocab = _vocabulary(vocabulary)
  if vocab is None and dataset is not None:
    provider = pipeline.get_mixture_or_task(dataset.mixture_or_task_name)
    vocab = seqio.get_subtasks(provider)[0].output_features["targets"].vocabulary
  lengths = dict(dataset.task_feature_lengths) if dataset else {}
  if input_file is None:
    records, rows = _task_examples(dataset, max_examples)
  elif vocab is None:
    raise UserError("--input_file needs a vocabulary: --vocab PATH|byte (or --task NAME)")
  else:
    records, rows = _file_examples(input_file, vocab, lengths.get("inputs", input_length))
    records, rows = records[:max_examples], rows[:max_examples]
  if not rows:
    raise UserError("there is nothing to decode: the inputs are empty")
  model, params, mesh = restore_for_eval(checkpoint_path, model_config, mesh_shape,
                                         model_overrides=model_overrides)
  too_big = max(max(r, default=0) for r in rows)
  if too_big >= model.config.vocab_size:
    raise UserError(f"token id {too_big} is outside the model's vocabulary of "
                    f"{model.config.vocab_size}; is this the model's vocabulary?")
  # One width for every batch (one compilation), a multiple of 8.
  inputs = np.zeros((len(rows), -(-max(len(r) for r in rows) // 8) * 8), np.int32)
  for i, row in enumerate(rows):
    inputs[i, :len(row)] = row
  tokens = decode_tokens(model, params, inputs, mesh=mesh,
                         batch_size=batch_size or (dataset.batch_size if dataset else 8),
                         max_decode_length=max_decode_length or lengths.get("targets", 64),
                         decode=decode, beam_size=beam_size, alpha=alpha)
  lines = [json.dumps({**record, "prediction": vocab.decode(row.tolist()),
                       "tokens": strip_after_eos(row)}, ensure_ascii=False) + "\n"
           for record, row in zip(records, tokens)]
  if jax.process_index() == 0:
    _write_atomically(Path(output_file), "".join(lines))
  return len(lines)
