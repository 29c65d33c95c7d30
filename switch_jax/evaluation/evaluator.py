"""`switch-jax eval`: a checkpoint's teacher-forced metrics and its tasks'
metrics on decoded outputs (`seqio.Evaluator`).

    evaluate(checkpoint_path="/runs/rte", dataset=DatasetConfig(
        "super_glue_rte_v102", {"inputs": 512, "targets": 8}, split="validation"))
    # {"loss": ..., "accuracy": ..., "num_tokens": ...,   teacher-forced
    #  "super_glue_rte_v102/accuracy": ...}               decoded, per task

Everything runs on the `('data', 'expert', 'model')` mesh: parameters are
restored onto their shardings, batches split over the batch axes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio
from jax.sharding import Mesh

from switch_jax import storage
from switch_jax.checkpoints import model_format
from switch_jax.config import ModelConfig
from switch_jax.data import pipeline, sources
from switch_jax.errors import UserError
from switch_jax.evaluation.inference import check_decode, decode_tokens
from switch_jax.evaluation.restore import restore_for_eval
from switch_jax.evaluation.teacher_forced import eval_dataset_metrics
from switch_jax.model.encoder_decoder import EncoderDecoder
import switch_jax.tasks  # noqa: F401  pylint: disable=unused-import  # registers the tasks datasets name


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
    check_decode(decode)
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
    storage.write_atomically(storage.path(output_dir) / "eval_results.json",
                             json.dumps(record, indent=2, sort_keys=True) + "\n")
  return results
