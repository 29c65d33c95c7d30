"""Inference: decoding encoder inputs on the mesh (`decode_tokens`) and
`switch-jax infer`, which writes a task's or a text file's decoded inputs as
JSON lines."""

from __future__ import annotations

import itertools
import json
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from switch_jax import partitioning, storage
from switch_jax.config import ModelConfig
from switch_jax.data import pipeline, sources, vocabularies
from switch_jax.errors import UserError
from switch_jax.evaluation import decoding
from switch_jax.evaluation.restore import check_checkpoint, restore_for_eval
from switch_jax.evaluation.teacher_forced import pad_rows
from switch_jax.model.encoder_decoder import EncoderDecoder
import switch_jax.tasks  # noqa: F401  pylint: disable=unused-import  # registers the tasks datasets name


EOS_ID = 1


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
      batch = {"encoder_input_tokens": _global(pad_rows({"x": chunk}, rows)["x"], mesh)}
      tokens = decoding.predict(model, params, batch, method=decode, beam_size=beam_size,
                                alpha=alpha, max_decode_length=max_decode_length, eos_id=EOS_ID)
      if not tokens.is_fully_addressable:
        tokens = multihost_utils.process_allgather(tokens, tiled=True)
      out.append(np.asarray(tokens)[:len(chunk)])
  if not out:
    return np.zeros((0, max_decode_length), np.int32)
  return _zero_after_eos(np.concatenate(out))


def check_decode(decode: str) -> None:
  if decode not in ("greedy", "beam"):
    raise UserError(f"decode must be 'greedy' or 'beam', got {decode!r}")


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
  path = storage.path(input_file)
  if not storage.is_there(path, "input file", "file"):
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
  check_checkpoint(checkpoint_path)
  check_decode(decode)
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
    storage.write_atomically(output_file, "".join(lines))
  return len(lines)
