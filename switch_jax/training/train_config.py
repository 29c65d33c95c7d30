"""The settings of a training run, in a few small groups that gin binds.

`train()` (trainer.py) takes one of each: `train.loop = @LoopConfig()`,
`train.evaluation = @EvalConfig()`, `train.checkpoint = @CheckpointConfig()`,
`train.step_config = @StepConfig()`, `train.init = @InitConfig()`,
`train.distill = @DistillConfig()` (runs/pretrain.gin binds them all), so a
gin file sets e.g. `EvalConfig.period = 500`. `MOVED_TRAIN_BINDINGS` names
where each setting `train` used to take itself went.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

# train.<old name> -> the binding that replaced it.
MOVED_TRAIN_BINDINGS = {
    "total_steps": "LoopConfig.total_steps",
    "stop_at_step": "LoopConfig.stop_at_step",
    "log_period": "LoopConfig.log_period",
    "max_nonfinite_steps": "LoopConfig.max_nonfinite_steps",
    "eval_period": "EvalConfig.period",
    "eval_steps": "EvalConfig.steps",
    "inference_evaluator": "EvalConfig.inference_evaluator",
    "num_microbatches": "StepConfig.num_microbatches",
    "z_loss": "StepConfig.z_loss",
    "initial_checkpoint_path": "InitConfig.checkpoint_path",
    "initialization": "InitConfig.mode",
    "teacher_checkpoint_path": "DistillConfig.teacher_checkpoint_path",
    "teacher_weight": "DistillConfig.teacher_weight",
}


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save and how many to keep.

  Attributes:
    period: save every `period` steps (and always at the end).
    keep: newest checkpoints to keep; None keeps all.
    async_save: write in the background while training goes on.
  """
  period: int = 1000
  keep: Optional[int] = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long the loop runs, how often it reports, and when it gives up.

  Attributes:
    total_steps: train until this step (the learning-rate schedule's length).
    stop_at_step: stop (after saving) at this step even if total_steps is
      further: to run a schedule in several sessions.
    log_period: steps between metrics records (and progress lines).
    max_nonfinite_steps: stop after this many steps in a row whose loss or
      gradients were not finite (each is skipped, not applied).
  """
  total_steps: int
  stop_at_step: Optional[int] = None
  log_period: int = 10
  max_nonfinite_steps: int = 5


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation during training, on `train(eval_dataset=...)`.

  Attributes:
    period: evaluate every `period` steps (and at the last step).
    steps: validation batches per evaluation, per task of a mixture.
    inference_evaluator: `inference_evaluator(model=, mesh=)` -> an object
      with `evaluate(params, step) -> dict` (decoding + the task's metrics);
      None evaluates teacher-forced loss and accuracy only.
  """
  period: int = 1000
  steps: int = 20
  inference_evaluator: Optional[Callable[..., Any]] = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What one optimizer step computes beyond the model.

  Attributes:
    num_microbatches: gradient accumulation steps per batch.
    z_loss: output-logit z-loss coefficient.
  """
  num_microbatches: int = 1
  z_loss: float = 1e-4


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Where a fresh run's parameters come from (a resumed run ignores it).

  Attributes:
    checkpoint_path: start from these parameters (a `convert`ed checkpoint
      or a training run) with a fresh optimizer: fine-tuning. None: random.
    mode: how its parameters map onto this model: 'exact' (same
      architecture), 'upcycle' (dense checkpoint -> Switch model, experts
      copied from the dense FFN), 'shared' (copy what matches; see
      warm_start.py).
  """
  checkpoint_path: Optional[str] = None
  mode: str = "exact"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Distillation: with a teacher the token loss becomes
  (1 - teacher_weight) * cross-entropy + teacher_weight * cross-entropy
  against the teacher's predictions (Table 6: 0.25).

  Attributes:
    teacher_checkpoint_path: the teacher's run or checkpoint; None trains on
      the ground truth alone.
    teacher_weight: the share of the teacher's soft targets.
  """
  teacher_checkpoint_path: Optional[str] = None
  teacher_weight: float = 0.25
