"""From a task or mixture name to host-local numpy batches, for the trainer.

    cfg = DatasetConfig("c4_span_corruption", {"inputs": 512, "targets": 114},
                        batch_size=256, seed=0)
    for batch in get_batches(cfg, jax.process_index(), jax.process_count(), start_batch=step):
      ...  # batch["encoder_input_tokens"]: <int32>[256 // process_count, 512]

Each host reads its own shard (`seqio.ShardInfo`: whole files when there are
enough, else every num_shards-th example) and gets `batch_size // num_shards`
examples per batch, in the feature layout of `seqio.EncDecFeatureConverter`.
Under a fixed seed the stream is a pure function of (cfg, shard), so a run
resumed at `start_batch=n` sees exactly what batch n onward would have been:
restored from the iterator state saved with the checkpoint
(`iterator_state`), at a cost independent of n, or else by recomputing and
dropping the first n batches. Training streams repeat forever;
`get_eval_batches` gives one unpacked, unshuffled pass.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Iterator, Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from switch_jax.data import iterator_state, sources
from switch_jax.errors import UserError

# TensorFlow only feeds data here; the accelerators belong to JAX.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already set up its devices
  pass


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read and how to batch it.

  Attributes:
    mixture_or_task_name: a registered seqio task or mixture (`switch-jax tasks`).
    task_feature_lengths: {"inputs": L_in, "targets": L_out} in tokens.
    split: "train", "validation", ...
    batch_size: global examples per batch, over all hosts.
    shuffle: shuffle files and examples (training).
    seed: seeds shuffling, mixing and the noise; None is not reproducible.
    pack: pack several examples per row (adds segment ids and positions).
    use_cached: read a seqio cache made by `seqio_cache_tasks`.
    num_epochs: passes over the data; None repeats forever.
    tfds_data_dir: where TFDS data is prepared; None: the gin binding
      `tfds_data_dir.path`, else each source's own directory, $TFDS_DATA_DIR
      or ~/tensorflow_datasets.
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "train"
  batch_size: int = 8
  shuffle: bool = True
  seed: Optional[int] = 0
  pack: bool = True
  use_cached: bool = False
  num_epochs: Optional[int] = None
  tfds_data_dir: Optional[str] = None


def get_mixture_or_task(name: str):
  """The registered task or mixture; a `UserError` naming close matches if unknown.

  Reads seqio's registry and fills nothing in it: the data layer lies below
  the tasks, so whoever names our tasks imports `switch_jax.tasks` first (the
  trainer, the evaluation and the CLI do).
  """
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = seqio.TaskRegistry.names() | seqio.MixtureRegistry.names()
    close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"no task or mixture named {name!r}{hint} (`switch-jax tasks` lists "
                    "them; from Python, `import switch_jax.tasks` registers them)") from None


def _leaf_tasks(provider) -> list[seqio.Task]:
  return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def _check_config(cfg: DatasetConfig, num_shards: int, shard_index: int) -> None:
  if not {"inputs", "targets"} <= set(cfg.task_feature_lengths):
    raise UserError("task_feature_lengths needs 'inputs' and 'targets', got "
                    f"{dict(cfg.task_feature_lengths)}")
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise UserError(f"shard_index {shard_index} is not in [0, {num_shards})")
  if cfg.batch_size % num_shards:
    raise UserError(f"batch_size {cfg.batch_size} does not divide over {num_shards} hosts")


def _load_vocabularies(tasks: list[seqio.Task]) -> None:
  """Loads them now: inside tf.data tracing a failure becomes a StagingError."""
  vocabularies = {id(f.vocabulary): f.vocabulary
                  for t in tasks for f in t.output_features.values()}
  try:
    for vocabulary in vocabularies.values():
      _ = vocabulary.vocab_size
  except UserError as e:
    missing = sources.missing_tfds_data(tasks)
    if missing:  # say everything that is missing at once
      raise UserError(f"{sources.missing_tfds_error(missing)} Also: {e}") from e
    raise


def _prepare(cfg: DatasetConfig, shard_index: int, num_shards: int):
  """The provider and its tasks, with the split, data dir and vocabularies checked."""
  _check_config(cfg, num_shards, shard_index)
  provider = get_mixture_or_task(cfg.mixture_or_task_name)
  tasks = _leaf_tasks(provider)
  splits = sorted({split for task in tasks for split in task.splits})
  if cfg.split not in splits:
    raise UserError(f"{cfg.mixture_or_task_name} has no split {cfg.split!r}; it has {splits}")
  sources.use_tfds_data_dir(tasks, sources.explicit_tfds_data_dir(cfg.tfds_data_dir))
  _load_vocabularies(tasks)
  return provider, tasks


def check_dataset(cfg: DatasetConfig, model_vocab_size: Optional[int] = None,
                  num_shards: int = 1) -> None:
  """Fails now, with a UserError naming the fix, on anything that would fail
  once training started: the name, split, batch split, prepared TFDS data,
  the vocabularies, and (given the model's) a vocabulary larger than the
  model's embedding."""
  _, tasks = _prepare(cfg, 0, num_shards)
  # Reading one example is the true test (prepared data, readable files,
  # not empty); it raises the same UserErrors get_dataset would.
  try:
    next(iter(get_dataset(dataclasses.replace(cfg, shuffle=False), 0, num_shards, batch=False)))
  except StopIteration:
    raise UserError(f"{cfg.mixture_or_task_name} split {cfg.split!r} has no examples; check "
                    "the files or data directory it reads") from None
  if model_vocab_size is None:
    return
  for task in tasks:
    for name, feature in task.output_features.items():
      size = feature.vocabulary.vocab_size
      if size > model_vocab_size:
        padded = -(-size // 128) * 128
        raise UserError(
            f"task {task.name}'s {name} vocabulary has {size} ids but the model embeds only "
            f"{model_vocab_size} (ModelConfig.vocab_size); use a model with vocab_size >= "
            f"{size} (e.g. --gin.ModelConfig.vocab_size={padded}) or the vocabulary the "
            "model was trained with")


def get_dataset(cfg: DatasetConfig, shard_index: int = 0, num_shards: int = 1,
                batch: bool = True) -> tf.data.Dataset:
  """The host's converted (and, with `batch`, batched) `tf.data.Dataset`."""
  provider, tasks = _prepare(cfg, shard_index, num_shards)
  # Under TFDS mock data, split sizes are unknown: passing no ShardInfo for
  # one host keeps seqio from asking for them.
  shard_info = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
  try:
    # seqio.get_dataset has no try_in_mem_cache; the in-memory cache would
    # also read split sizes, so call the provider directly.
    ds = provider.get_dataset(
        sequence_length=dict(cfg.task_feature_lengths), split=cfg.split,
        use_cached=cfg.use_cached, shuffle=cfg.shuffle, seed=cfg.seed,
        shard_info=shard_info, num_epochs=cfg.num_epochs, try_in_mem_cache=False)
  except (AssertionError, KeyError, tf.errors.NotFoundError,
          tfds.core.registered.DatasetNotFoundError) as e:
    missing = sources.missing_tfds_data(tasks)
    if missing:
      raise sources.missing_tfds_error(missing) from e
    raise
  converter = seqio.EncDecFeatureConverter(pack=cfg.pack)
  ds = converter(ds, task_feature_lengths=dict(cfg.task_feature_lengths))
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  if batch:
    ds = ds.batch(cfg.batch_size // num_shards, drop_remainder=True)
  return ds


def stream_identity(cfg: DatasetConfig, shard_index: int = 0, num_shards: int = 1) -> dict:
  """What makes a host's training stream the one it is: the settings and the shard."""
  record = dataclasses.asdict(cfg)
  record["task_feature_lengths"] = dict(record["task_feature_lengths"])
  return {"dataset": record, "shard_index": shard_index, "num_shards": num_shards}


def get_batches(cfg: DatasetConfig, shard_index: int = 0, num_shards: int = 1,
                start_batch: int = 0, saved_state: Optional[bytes] = None,
                missing_because: str = "the checkpoint saved no data position",
                warn: Callable[[str], None] = lambda message: None
                ) -> iterator_state.HostBatches:
  """Host-local batches `{feature: <int32>[batch_size // num_shards, length]}`.

  Features: encoder_input_tokens, decoder_target_tokens, decoder_input_tokens,
  decoder_loss_weights, and with packing encoder/decoder_segment_ids and
  encoder/decoder_positions.

  Resuming at `start_batch`: `saved_state` (what `.state()` of this host's
  batches gave at that batch) restores the position at a cost independent
  of `start_batch`; without it, or if it does not fit (another shard, other
  settings), the first `start_batch` batches are recomputed and dropped,
  after `warn` gets one line saying why (`missing_because` when there is no
  state). See `iterator_state`.
  """
  return iterator_state.resume(lambda: get_dataset(cfg, shard_index, num_shards).prefetch(2),
                               stream_identity(cfg, shard_index, num_shards), start_batch,
                               saved_state, missing_because, warn)


def get_eval_batches(cfg: DatasetConfig, shard_index: int = 0, num_shards: int = 1
                     ) -> Iterator[dict[str, np.ndarray]]:
  """One unpacked, unshuffled pass; the last batch is padded with all-zero rows.

  Zero rows have zero `decoder_loss_weights`, so sums over the batch are
  unchanged and every batch has the same shape (one compiled step).
  """
  cfg = dataclasses.replace(cfg, shuffle=False, pack=False, num_epochs=1)
  per_host = cfg.batch_size // num_shards
  ds = get_dataset(cfg, shard_index, num_shards, batch=False).batch(per_host)
  for batch in ds.as_numpy_iterator():
    rows = next(iter(batch.values())).shape[0]
    if rows < per_host:
      batch = {k: np.pad(v, [(0, per_host - rows)] + [(0, 0)] * (v.ndim - 1))
               for k, v in batch.items()}
    yield batch
