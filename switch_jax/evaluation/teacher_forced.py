"""Teacher-forced evaluation: the validation loss and accuracy of a model
on a task's (or mixture's) split, averaged over real target tokens, with the
names training records (`run_logging.METRICS`).

Batches are split over the `('data', 'expert', 'model')` mesh's batch axes;
a short batch is padded with all-zero rows (no loss weight), so the step
compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from switch_jax import partitioning, run_logging
from switch_jax.data import pipeline
from switch_jax.errors import UserError
from switch_jax.model import losses
from switch_jax.model.encoder_decoder import EncoderDecoder
import switch_jax.tasks  # noqa: F401  pylint: disable=unused-import  # registers the tasks datasets name


_BATCH_FEATURES = losses.MODEL_INPUTS + ("decoder_loss_weights",)


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
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
    metrics = losses.eval_step(params, batch, model=model)
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
        template = batch = pad_rows({k: batch[k] for k in _BATCH_FEATURES if k in batch}, rows)
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
