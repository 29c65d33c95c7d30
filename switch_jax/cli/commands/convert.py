"""`switch-jax convert`: Hugging Face checkpoints to ours and back.

  switch-jax convert --from hf --hf_dir DIR --out CHECKPOINT
  switch-jax convert --to hf --checkpoint CHECKPOINT --out DIR [--expert_capacity N]

The exported CHECKPOINT may be a converted one, a training run's MODEL_DIR
(its newest complete step) or one step directory.

Everything is read and checked before anything is written, and the output
appears atomically, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import argparse
import math
import sys

import jax

from switch_jax import storage
from switch_jax.checkpoints import hf, model_format
from switch_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from", dest="source", choices=["hf"],
                         help="import: read a Hugging Face SwitchTransformers directory")
  direction.add_argument("--to", dest="target", choices=["hf"],
                         help="export: write a Hugging Face SwitchTransformers directory")
  parser.add_argument("--hf_dir", help="(--from hf) directory with config.json and "
                      "model.safetensors, sharded safetensors or pytorch_model.bin")
  parser.add_argument("--checkpoint", help="(--to hf) " + model_format.CHECKPOINT_HELP)
  parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  parser.add_argument("--expert_capacity", type=int, default=None,
                      help="(--to hf) HF's per-sequence expert capacity, for models trained "
                      "with capacity factors")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _summary(config, params) -> str:
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  experts = f", {config.num_experts} experts" if config.is_moe else ""
  return (f"{total:,} parameters, d_model {config.d_model}, {config.num_encoder_layers}+"
          f"{config.num_decoder_layers} layers{experts}, {config.ffn_activation}")


def run(args: argparse.Namespace) -> int:
  if args.source == "hf":
    if not args.hf_dir:
      raise UserError("--from hf needs --hf_dir DIR")
    if args.checkpoint or args.expert_capacity is not None:
      raise UserError("--checkpoint and --expert_capacity go with --to hf, not --from hf")
    config, params = hf.load_hf_dir(args.hf_dir)
    source = hf.load_hf_config(args.hf_dir).get("_name_or_path") or str(
        storage.path(args.hf_dir))
    model_format.save_model(args.out, config, params, metadata={"source": f"hf:{source}"},
                           overwrite=args.overwrite)
  else:
    if not args.checkpoint:
      raise UserError("--to hf needs --checkpoint DIR")
    if args.hf_dir:
      raise UserError("--hf_dir goes with --from hf, not --to hf")
    if args.expert_capacity is not None and args.expert_capacity <= 0:
      raise UserError(f"--expert_capacity must be positive, got {args.expert_capacity}")
    config, params = model_format.load_model(args.checkpoint)
    if config.ffn_activation == "geglu":
      print("note: HF's SwitchTransformers class has no gated-GELU FFN; the tensors use T5's "
            "wi_0/wi_1 names and need a gated FFN to load", file=sys.stderr)
    if config.is_moe and config.group_size is not None:
      print(f"note: HF routes each sequence alone with a fixed capacity; this model routes "
            f"groups of {config.group_size} tokens", file=sys.stderr)
    hf.save_hf_dir(args.out, config, params, expert_capacity=args.expert_capacity,
                   overwrite=args.overwrite)
  print(f"wrote {args.out}: {_summary(config, params)}")
  return 0
