"""`switch-jax infer`: decode a task's inputs or a text file into JSON lines.

    switch-jax infer --checkpoint DIR --task super_glue_rte_v102 --output preds.jsonl
    switch-jax infer --checkpoint DIR --input_file questions.txt --vocab byte \\
      --output preds.jsonl [--decode beam --beam_size 4] [--max_decode_length 64]

or from gin files (the `infer` configurable) with `--gin_file` and
`--gin.NAME=VALUE`. Each output line, in input order, is
{"input": text, "prediction": text, "tokens": [ids through EOS]}, plus
"target" for a task's examples. The file appears whole or not at all.
"""

from __future__ import annotations

import argparse

from switch_jax.cli.commands import evaluate, gin_flags
from switch_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  gin_flags.add_gin_arguments(parser)
  evaluate.add_dataset_arguments(parser)
  parser.add_argument("--input_file", default=None, help="text file, one input per line")
  parser.add_argument("--vocab", default=None,
                      help="SentencePiece model file, or 'byte' (default: the task's)")
  parser.add_argument("--output", default=None, help="output JSONL file")
  parser.add_argument("--max_decode_length", type=int, default=None,
                      help="most tokens to generate (default: the task's target length, else 64)")
  parser.add_argument("--input_length", type=int, default=None,
                      help="cut file inputs to this many tokens (default 512)")


def run(args) -> int:
  evaluate.setup(args)
  kwargs = evaluate.plain_kwargs(args)
  if args.input_file:
    kwargs["input_file"] = args.input_file
  if args.vocab:
    kwargs["vocabulary"] = args.vocab
  if args.output:
    kwargs["output_file"] = args.output
  for name in ("max_decode_length", "input_length"):
    value = getattr(args, name)
    if value is not None:
      if value <= 0:
        raise UserError(f"--{name} must be positive, got {value}")
      kwargs[name] = value
  if args.batch_size:
    kwargs["batch_size"] = args.batch_size
  if not args.gin_file:
    if not args.output:
      raise UserError("--output is required")
    if not args.task and not args.input_file:
      raise UserError("give --task NAME or --input_file FILE (with --vocab PATH|byte)")
  lines = evaluate.configured("infer", args, kwargs)
  # JAX is first imported by gin_flags.setup, after the flags are checked.
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    print(f"wrote {lines} predictions to {kwargs.get('output_file', 'the output file')}")
  return 0
