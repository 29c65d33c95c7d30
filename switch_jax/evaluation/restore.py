"""A checkpoint's model and parameters on a device mesh, for evaluation and
inference: each parameter is written straight onto its shards."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
from jax.sharding import Mesh

from switch_jax import partitioning
from switch_jax.checkpoints import model_format, train_state
from switch_jax.config import ModelConfig
from switch_jax.errors import UserError
from switch_jax.model.encoder_decoder import EncoderDecoder
from switch_jax.model.param_count import abstract_params


def restore_params(source: model_format.ModelSource, model: EncoderDecoder, mesh: Mesh):
  """The parameters `source` holds, each written straight onto its shards."""
  boxed = abstract_params(model.config)
  target = train_state.abstract_like(nn.unbox(boxed),
                                     partitioning.logical_to_sharding(boxed, mesh))
  return source.restore(target)


def check_checkpoint(checkpoint_path) -> None:
  """Fails before any data is read if no model is there (the one resolver)."""
  model_format.resolve(checkpoint_path)


def restore_for_eval(checkpoint_path, model_config: Optional[ModelConfig] = None,
                     mesh_shape=(-1, 1, 1), batch_size: Optional[int] = None,
                     model_overrides: Optional[Mapping[str, Any]] = None):
  """(model, params on the mesh, mesh) of a model checkpoint or training run;
  `model_config` None reads the checkpoint's, with the fields in
  `model_overrides` replaced (e.g. {"eval_capacity_factor": 4.0}). A run
  directory is resolved once, so config and parameters are of one step even
  if the run saves a newer one meanwhile."""
  source = model_format.resolve(checkpoint_path)
  config = model_config or source.config()
  if model_overrides:
    try:
      config = config.replace(**model_overrides)
    except TypeError as e:  # a name that is no ModelConfig field
      raise UserError(f"ModelConfig overrides {dict(model_overrides)}: {e}") from None
  mesh = partitioning.make_mesh(mesh_shape)
  partitioning.check_fits(config, partitioning.mesh_shape(mesh), batch_size)
  model = EncoderDecoder(config)
  return model, restore_params(source, model, mesh), mesh
