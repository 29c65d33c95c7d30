"""The training loop, t5x-style: data, state, restore, loop, eval, save.

`train` is what `switch-jax train` runs with its arguments bound by gin;
its settings come in the small groups of train_config.py (`LoopConfig`,
`EvalConfig`, `CheckpointConfig`, `StepConfig`, `InitConfig`,
`DistillConfig`). It speaks to the user on stdout: progress lines, one line
per event, and warnings as lines starting "WARNING:".
Re-running the same command resumes from the newest complete checkpoint
(parameters, optimizer state and data position). SIGTERM, which is how
pods announce preemption, saves the current step and returns.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from switch_jax import partitioning, run_logging
from switch_jax.model import losses
from switch_jax.checkpoints import model_format, train_state
from switch_jax.checkpoints.data_position import SavedPosition
from switch_jax.training import warm_start
from switch_jax.training.train_config import (CheckpointConfig, DistillConfig, EvalConfig,
                                              InitConfig, LoopConfig, StepConfig)
from switch_jax.training import train_step as ts
from switch_jax.config import ModelConfig
from switch_jax.data import pipeline
from switch_jax.errors import ConfigError, SplitNotBoundError, UserError
from switch_jax.model.encoder_decoder import EncoderDecoder
import switch_jax.tasks  # noqa: F401  pylint: disable=unused-import  # registers the tasks datasets name


class _Preemption:
  """Turns SIGTERM into a stop at a step every host agrees on.

  One process: our own SIGTERM handler sets a flag. Several: hosts get the
  signal at different moments, and stopping (and saving, a collective) at
  different steps would hang the pod, so they agree through JAX's preemption
  sync point (its service handles the signal), or, without that service,
  by gathering our flags every step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._jax_service = False

  def __enter__(self):
    if jax.process_count() > 1:
      state = getattr(getattr(jax, "_src").distributed, "global_state", None)
      self._jax_service = getattr(state, "preemption_sync_manager", None) is not None
    if not self._jax_service:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, step: int) -> bool:
    """Whether every host stops after this step."""
    if jax.process_count() == 1:
      return self.requested
    if self._jax_service:
      return multihost_utils.reached_preemption_sync_point(step)
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.max(flags))


def _load_other_model(path, mesh):
  """(model, params on the mesh) of a checkpoint with its own config."""
  config = model_format.load_config(path)
  model = EncoderDecoder(config)
  boxed = _abstract_boxed(model, (1, 1))
  target = train_state.abstract_like(nn.unbox(boxed),
                                           partitioning.logical_to_sharding(boxed, mesh))
  return model, model_format.load_params(path, target)


def _abstract_boxed(model: EncoderDecoder, lengths):
  with jax.set_mesh(None):  # shapes only: no batch to split over the mesh
    return jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.ones((1, lengths[0]), jnp.int32),
        jnp.ones((1, lengths[1]), jnp.int32))["params"])


def _initial_state(model, optimizer, mesh, shardings, abstract_state, lengths,
                   init: InitConfig, seed):
  """Fresh parameters, or a checkpoint's (mapped by `init.mode`, see
  warm_start.py) with a fresh optimizer."""
  initial_checkpoint_path, initialization = init.checkpoint_path, init.mode
  fresh = ts.make_init(model, optimizer, mesh, shardings, 1, lengths)(jax.random.PRNGKey(seed))
  if initial_checkpoint_path is None:
    return fresh
  if initialization not in warm_start.MODES:
    raise ConfigError(f"InitConfig.mode must be one of {warm_start.MODES}, got "
                      f"{initialization!r}")
  if initialization == "exact":
    _check_compatible(model_format.load_config(initial_checkpoint_path), model.config,
                      initial_checkpoint_path)
    params = model_format.load_params(initial_checkpoint_path, abstract_state.params)
  else:
    _, source = _load_other_model(initial_checkpoint_path, mesh)
    if initialization == "upcycle":
      mapping = warm_start.upcycle
    else:
      mapping = lambda src, new: warm_start.copy_matching(src, new)[0]
      copied = warm_start.copy_matching(jax.eval_shape(lambda: source), fresh.params)[1]
      _say(f"Initialized {len(copied)} parameters from {initial_checkpoint_path}; the rest "
           "fresh")
    params = jax.jit(mapping, out_shardings=shardings.params)(source, fresh.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  _say(f"Initialized from {initial_checkpoint_path} ({initialization}); optimizer state reset")
  return ts.TrainState(jnp.zeros((), jnp.int32), params, opt_state)


# Fields that may differ between a checkpoint and the model that reads it.
_TRAINING_ONLY_FIELDS = {
    "dropout_rate", "expert_dropout_rate", "train_capacity_factor", "eval_capacity_factor",
    "expert_capacity", "min_expert_capacity", "group_size", "jitter_noise", "dtype",
    "router_dtype", "aux_loss_factor", "router_z_loss_factor", "dispatch",
    "batch_prioritized_routing", "ignore_padding_tokens", "router", "decoder_router",
    "expert_choice_eval_capacity_factor",
}


def _check_compatible(stored: ModelConfig, wanted: ModelConfig, path) -> None:
  diffs = [f"{f.name}: checkpoint {getattr(stored, f.name)!r}, run {getattr(wanted, f.name)!r}"
           for f in dataclasses.fields(ModelConfig)
           if f.name not in _TRAINING_ONLY_FIELDS
           and getattr(stored, f.name) != getattr(wanted, f.name)]
  if diffs:
    raise ConfigError(f"the model config does not match the checkpoint {path}: "
                      + "; ".join(diffs) + ". Use the model gin file the checkpoint was "
                      "made with (or `switch-jax convert`'s config).")


def _host_batches(dataset: pipeline.DatasetConfig, start_batch: int, step: int,
                  saved: Optional[SavedPosition]):
  """This host's stream at `start_batch`: restored from step `step`'s saved
  position, else replayed after one line saying why."""
  if saved is None:
    missing = (f"checkpoint {step} has no saved data position (saved by an older switch_jax, "
               "or by a data pipeline that cannot save one)")
  else:
    hosts = " or ".join(map(str, saved.host_counts())) or "no"
    missing = (f"checkpoint {step} saved the data positions of {hosts} hosts and this run has "
               f"{jax.process_count()}; each host reads its own shard, so these hosts' streams "
               "are not the uninterrupted run's")
  return pipeline.get_batches(dataset, jax.process_index(), jax.process_count(),
                              start_batch=start_batch,
                              saved_state=saved.state if saved is not None else None,
                              missing_because=missing, warn=_warn)


def _to_global(batch: Mapping[str, np.ndarray], sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def _tokens(batch: Mapping[str, np.ndarray]) -> float:
  """Real input + target tokens in this host's batch, times the hosts."""
  count = sum(int(np.count_nonzero(batch[k])) for k in
              ("encoder_input_tokens", "decoder_target_tokens") if k in batch)
  return float(count * jax.process_count())


def _evaluate(model, params, dataset, mesh, eval_steps):
  """Validation metrics over at most `eval_steps` batches of each task (a
  mixture's tasks one by one, each reported too)."""
  from switch_jax.evaluation import teacher_forced  # pylint: disable=import-outside-toplevel
  return teacher_forced.eval_dataset_metrics(model, params, dataset, mesh=mesh,
                                              max_batches=eval_steps)


def _say(message: str) -> None:
  """A line for the user, on stdout beside the progress lines."""
  print(message, flush=True)


def _warn(message: str) -> None:
  _say(f"WARNING: {message}")


def train(*, model_dir: str, model_config: ModelConfig, train_dataset: pipeline.DatasetConfig,
          optimizer: Callable[..., Any], learning_rate: Callable[[int], Any], loop: LoopConfig,
          eval_dataset: Optional[pipeline.DatasetConfig] = None,
          evaluation: EvalConfig = EvalConfig(), checkpoint: CheckpointConfig = CheckpointConfig(),
          step_config: StepConfig = StepConfig(), init: InitConfig = InitConfig(),
          distill: DistillConfig = DistillConfig(), mesh_shape: Sequence[int] = (-1, 1, 1),
          random_seed: int = 0, run_config: Optional[str] = None) -> dict:
  """Trains (or resumes) a model; returns the last train and eval metrics.

  Args:
    model_dir: where checkpoints, metrics.jsonl and TensorBoard logs go.
    model_config: the model.
    train_dataset: the training stream (global batch size).
    optimizer: `optimizer(learning_rate=..., boxed_params=...)` -> an optax
      GradientTransformation (gin: `@make_optimizer`).
    learning_rate: schedule, step -> rate (gin: `@rsqrt_schedule()`).
    loop: total steps, where to stop, log period, non-finite tolerance.
    eval_dataset: validation data for loss/accuracy every
      `evaluation.period`; a split that names no data (no
      `local_files.validation`) is dropped, said once.
    evaluation: when and how much to evaluate, and the decoding evaluator.
    checkpoint: save period and retention.
    step_config: microbatches and the z-loss of each step.
    init: the checkpoint a fresh run starts from, and how it maps.
    distill: the teacher and its weight.
    mesh_shape: (data, expert, model); -1 takes the remaining devices.
    random_seed: seeds initialization and dropout.
    run_config: the configuration text to keep as MODEL_DIR/config.gin,
      written once every check has passed (a bad command changes nothing).
  """
  # Data: every plan is checked before anything is compiled.
  mesh_shape = partitioning.resolve_mesh_shape(mesh_shape, jax.device_count())
  eval_dataset = _check_run(model_config, mesh_shape, train_dataset, eval_dataset, loop)
  model_dir = _prepare_model_dir(model_dir, run_config)
  lengths = (train_dataset.task_feature_lengths["inputs"],
             train_dataset.task_feature_lengths["targets"])
  mesh = partitioning.make_mesh(mesh_shape)
  model = EncoderDecoder(model_config)
  with jax.set_mesh(mesh):
    # State: its shapes and shardings, without allocating it.
    boxed = _abstract_boxed(model, lengths)
    tx = optimizer(learning_rate=learning_rate, boxed_params=boxed)
    shardings = ts.state_shardings(model, tx, mesh, 1, lengths)
    abstract_state = train_state.abstract_like(
        jax.eval_shape(ts.init_fn(model, tx, 1, lengths), jax.random.PRNGKey(0)), shardings)

    # Restore: the newest checkpoint, else a fresh (or warm-started) state.
    checkpointer = train_state.TrainCheckpointer(model_dir, checkpoint.keep,
                                                 checkpoint.async_save)
    restored = checkpointer.restore_latest(abstract_state)
    saved_data = None
    if restored is not None:
      step, state, meta, saved_data = restored
      start_batch = int(meta["data"]["batches"])
      if meta["data"].get("dataset") != _dataset_record(train_dataset):
        _warn(f"the training data settings changed since step {step}; reading on from batch "
              f"{start_batch} of the new stream")
      _say(f"Resuming from {checkpointer.directory / str(step)} at step {step}")
    else:
      state = _initial_state(model, tx, mesh, shardings, abstract_state, lengths, init,
                             random_seed)
      step, start_batch = 0, 0
    first_step = int(step)

    def save(at_step, at_state):
      # The iterator's bytes are taken now, before the next batch is read;
      # the arrays are written in the background.
      checkpointer.save(at_step, at_state, model_config,
                        {"batches": batches.position, "dataset": _dataset_record(train_dataset)},
                        data_state=batches.state_or_none(_warn))

    step_fn, teacher_args = _make_step(model, tx, mesh, shardings, step_config, distill)
    batch_sharding = partitioning.batch_sharding(mesh)
    batches = _host_batches(train_dataset, start_batch, first_step, saved_data)
    logger = run_logging.MetricsLogger(model_dir, loop.total_steps,
                                       enabled=jax.process_index() == 0)
    inference = (evaluation.inference_evaluator(model=model, mesh=mesh)
                 if evaluation.inference_evaluator is not None else None)
    rng = jax.random.PRNGKey(random_seed + 1)
    last_step = min(loop.total_steps, loop.stop_at_step or loop.total_steps)
    summary: dict = {}
    meter = _Throughput()
    guard = _NonFiniteGuard(loop.max_nonfinite_steps, logger, checkpointer)
    previous = None  # checked one step late, so the host never waits on the device

    # Loop: step, log, eval, save; a preemption saves and stops.
    try:
      with _Preemption() as preemption:
        while step < last_step:
          host_batch = next(batches)
          state, metrics = step_fn(state, _to_global(host_batch, batch_sharding), rng,
                                   *teacher_args)
          step += 1
          if step == first_step + 1:  # the first step compiled: keep it out of the timing
            jax.block_until_ready(metrics)
            meter.reset()
          else:
            meter.add(_tokens(host_batch))
          if previous is not None:
            guard.check(*previous)
          previous = (step, metrics)
          if step % loop.log_period == 0 or step == last_step:
            summary["train"] = _log_metrics(logger, step, metrics, meter, learning_rate,
                                            model_config)
          if eval_dataset is not None and (step % evaluation.period == 0 or step == last_step):
            summary["eval"] = {"step": step, **_evaluate(model, state.params, eval_dataset, mesh,
                                                         evaluation.steps)}
            if inference is not None:
              summary["eval"].update(inference.evaluate(state.params, step))
            logger.write(summary["eval"], prefix="eval")
          stopping = preemption.agreed(step)
          if step % checkpoint.period == 0 or step == last_step or stopping:
            save(step, state)
            logger.sync()  # on a bucket: the new metrics lines and event files go up now
          if step % evaluation.period == 0 or step % checkpoint.period == 0:  # not training time
            meter.reset()
          if stopping:
            _say(f"Preempted (SIGTERM): saved step {step}; exiting")
            break
        if previous is not None:
          guard.check(*previous)
    finally:
      try:
        # Finishes any save in flight, so no checkpoint is left half-written;
        # a save that failed (full disk, bucket error) raises its one-line UserError.
        checkpointer.close()
      finally:
        logger.close()
  summary["step"] = int(step)
  summary["checkpoint_dir"] = str(checkpointer.directory)
  return summary


def _check_run(model_config, mesh_shape, train_dataset, eval_dataset, loop):
  """Checks the mesh, the data and the loop; returns the eval dataset, None
  when its split names no data."""
  partitioning.check_fits(model_config, mesh_shape, train_dataset.batch_size)
  pipeline.check_dataset(train_dataset, model_config.vocab_size, jax.process_count())
  if eval_dataset is not None:
    try:
      pipeline.check_dataset(eval_dataset, model_config.vocab_size, jax.process_count())
    except SplitNotBoundError as e:  # e.g. no local_files.validation: optional for training
      _say(f"No evaluation during training: {e}")
      eval_dataset = None
  if loop.total_steps <= 0:
    raise ConfigError(f"LoopConfig.total_steps must be positive, got {loop.total_steps}")
  return eval_dataset


def _prepare_model_dir(model_dir, run_config):
  """MODEL_DIR (local or a bucket, gs://...), with the run's config.gin."""
  model_dir = epath.Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  if run_config is not None and jax.process_index() == 0:
    partial = model_dir / "config.gin.tmp"
    partial.write_text(run_config)
    partial.replace(model_dir / "config.gin")
  return model_dir


def _make_step(model, tx, mesh, shardings, step_config: StepConfig, distill: DistillConfig):
  """(the jitted train step, its extra arguments: the teacher's parameters)."""
  teacher, teacher_args = None, ()
  if distill.teacher_checkpoint_path is not None:
    teacher_model, teacher_params = _load_other_model(distill.teacher_checkpoint_path, mesh)
    teacher, teacher_args = losses.Teacher(teacher_model, distill.teacher_weight), (teacher_params,)
  step_fn = ts.make_train_step(
      model, tx, mesh, shardings, num_microbatches=step_config.num_microbatches,
      z_loss=step_config.z_loss, teacher=teacher,
      teacher_shardings=jax.tree.map(lambda x: x.sharding, teacher_args[0]) if teacher else None)
  return step_fn, teacher_args


def _log_metrics(logger, step, metrics, meter, learning_rate, model_config) -> dict:
  """Writes the step's metrics record and its progress line; returns it."""
  metrics = jax.device_get(metrics)  # waits for the step: the timing is honest
  record = run_logging.to_record(step, metrics, learning_rate=learning_rate(step - 1),
                                 **meter.take())
  if "expert_load" in record:
    record["expert_load_layers"] = losses.switch_layer_names(model_config)
  logger.write(record)
  logger.progress(record)
  return record


def _dataset_record(dataset: pipeline.DatasetConfig) -> dict:
  return pipeline.stream_identity(dataset)["dataset"]


class _Throughput:
  """Tokens and seconds per step over the steps since the last take/reset."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.start, self.tokens, self.steps = time.monotonic(), 0.0, 0

  def add(self, tokens: float):
    self.tokens += tokens
    self.steps += 1

  def take(self) -> dict:
    steps = max(self.steps, 1)
    seconds = (time.monotonic() - self.start) / steps if self.steps else 0.0
    out = {"tokens": self.tokens / steps, "seconds_per_step": seconds}
    self.reset()
    return out


class _NonFiniteGuard:
  """Reports steps the train step refused (non-finite loss or gradients) and
  stops the run after `limit` in a row, before anything is overwritten."""

  def __init__(self, limit: int, logger, checkpointer):
    self.limit, self.logger, self.checkpointer = limit, logger, checkpointer
    self.in_a_row = 0

  def check(self, step: int, metrics) -> None:
    if bool(jax.device_get(metrics["finite"])):
      self.in_a_row = 0
      return
    self.in_a_row += 1
    metrics = jax.device_get(metrics)
    event = {"step": step, "event": "non_finite_step_skipped",
             "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}
    if "router/max_abs_logit_per_layer" in metrics:
      event["router_max_abs_logit_per_layer"] = np.asarray(
          metrics["router/max_abs_logit_per_layer"]).tolist()
      event["fraction_dropped"] = float(metrics["router/fraction_dropped"])
    self.logger.write(event, prefix="event")
    _warn(f"step {step} not applied: loss {event['loss']}, gradient norm "
          f"{event['grad_norm']}" + (f", router |logits| up to "
          f"{max(event['router_max_abs_logit_per_layer']):.3g}"
          if "router_max_abs_logit_per_layer" in event else ""))
    if self.in_a_row >= self.limit:
      steps = self.checkpointer.steps()
      kept = f"the last good checkpoint is step {steps[-1]}" if steps else "no checkpoint yet"
      raise UserError(
          f"{self.in_a_row} steps in a row had a non-finite loss or gradients (last at step "
          f"{step}); stopping, {kept}. Lower the learning rate, clip gradients "
          "(make_optimizer.grad_clip_norm), keep the router in float32, or raise "
          "ModelConfig.router_z_loss_factor.")
