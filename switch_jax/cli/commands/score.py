"""`switch-jax score`: summed target negative log-likelihood of JSONL examples.

  switch-jax score --checkpoint DIR --examples FILE.jsonl [--out FILE] [--batch_size N]

DIR is a model checkpoint (`switch-jax convert`), a training run's
MODEL_DIR (its newest complete step) or one step directory.

Each input line is `{"inputs": [ids], "targets": [ids]}` (id 0 is padding,
so it may not appear); each output line, in input order, is
`{"loss": <summed target NLL>, "tokens": <number of targets>}`. The model
runs in eval mode; decoder inputs are the targets shifted right with 0.

Batches are padded to lengths in multiples of 8 (and to a full batch), so
few shapes compile. A model converted from Hugging Face routes each
sequence alone, so its scores do not depend on batching; a model with
routing groups spanning sequences shares expert capacity across the batch.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import numpy as np

from switch_jax import storage
from switch_jax.checkpoints import model_format
from switch_jax.errors import UserError
from switch_jax.model import losses
from switch_jax.model.encoder_decoder import EncoderDecoder

_LENGTH_MULTIPLE = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True, help=model_format.CHECKPOINT_HELP)
  parser.add_argument("--examples", required=True, help="JSONL file of {inputs, targets}")
  parser.add_argument("--out", help="output JSONL file (default: stdout)")
  parser.add_argument("--batch_size", type=int, default=16, help="examples per batch")


def _token_ids(value, name: str, where: str) -> list[int]:
  if (not isinstance(value, list) or not value
      or not all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
    raise UserError(f"{where}: {name!r} must be a non-empty list of integer token ids")
  if min(value) <= 0:
    raise UserError(f"{where}: {name!r} contains id {min(value)}; ids must be >= 1 "
                    "(0 is padding)")
  return value


def read_examples(path) -> list[tuple[list[int], list[int], int]]:
  """[(inputs, targets, line number)] of a JSONL file, validated."""
  path = storage.path(path)
  if not storage.is_there(path, "examples file", "file"):
    raise UserError(f"examples file {path} does not exist")
  examples = []
  with path.open("r", encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      where = f"{path}:{number}"
      if not line.strip():
        raise UserError(f"{where}: empty line; each line must be one JSON object")
      try:
        example = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(example, dict) or not {"inputs", "targets"} <= set(example):
        raise UserError(f'{where}: expected an object with "inputs" and "targets"')
      examples.append((_token_ids(example["inputs"], "inputs", where),
                       _token_ids(example["targets"], "targets", where), number))
  if not examples:
    raise UserError(f"examples file {path} is empty")
  return examples


def _bucket(length: int) -> int:
  return -(-length // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE


def _pad(rows: list[list[int]], batch: int, length: int) -> np.ndarray:
  out = np.zeros((batch, length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


@functools.lru_cache(maxsize=8)
def _scorer(config):
  """A jitted `(params, inputs, decoder_inputs, targets) -> <float32>[B]` per
  config, cached so repeated scoring does not recompile."""
  model = EncoderDecoder(config)

  def scores(params, inputs, decoder_inputs, targets):
    logits = model.apply({"params": params}, inputs, decoder_inputs, targets,
                         deterministic=True)
    return losses.sequence_scores(logits, targets)

  return jax.jit(scores)


def score_examples(config, params, examples, batch_size: int) -> list[dict]:
  """[{'loss', 'tokens'}] for each (inputs, targets, _) example, in order."""
  scores = _scorer(config)
  rows = min(batch_size, len(examples))  # every batch, the last one too, has one shape
  results = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    inputs = _pad([e[0] for e in chunk], rows, _bucket(max(len(e[0]) for e in chunk)))
    targets = _pad([e[1] for e in chunk], rows, _bucket(max(len(e[1]) for e in chunk)))
    decoder_inputs = np.zeros_like(targets)
    decoder_inputs[:, 1:] = targets[:, :-1]
    batch_scores = np.asarray(scores(params, inputs, decoder_inputs, targets))
    results += [{"loss": float(batch_scores[i]), "tokens": len(e[1])}
                for i, e in enumerate(chunk)]
  return results


def run(args: argparse.Namespace) -> int:
  if args.batch_size <= 0:
    raise UserError(f"--batch_size must be positive, got {args.batch_size}")
  examples = read_examples(args.examples)
  if args.out and not storage.parent_exists(args.out):
    raise UserError(f"--out {args.out}: its directory does not exist")
  config, params = model_format.load_model(args.checkpoint)
  for inputs, targets, number in examples:
    top = max(max(inputs), max(targets))
    if top >= config.vocab_size:
      raise UserError(f"{args.examples}:{number}: token id {top} is outside the model's "
                      f"vocabulary of {config.vocab_size}")
  lines = "".join(json.dumps(r) + "\n" for r in
                  score_examples(config, params, examples, args.batch_size))
  if args.out:
    storage.write_atomically(args.out, lines)  # readers never see a partial file
  else:
    sys.stdout.write(lines)
  return 0
