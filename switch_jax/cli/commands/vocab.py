"""`switch-jax vocab`: train a SentencePiece vocabulary on local text, once.

    switch-jax vocab --input corpus/*.txt --vocab_size 32000 --out vocab/
    switch-jax vocab --embedded     # build the embedded corpus and its vocabulary

The model has T5's special ids (pad 0, eos 1, unk 2, no bos); seqio adds
100 sentinel ids on top. A second run with the same input and settings
reuses the cached model.
"""

from __future__ import annotations

import argparse
import json
import time

from switch_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--input", nargs="+", default=[],
                      help="text (.txt) or JSON-lines (.jsonl) files or globs, one document "
                           "per line; .gz allowed")
  parser.add_argument("--vocab_size", type=int, default=32000,
                      help="pieces before the 100 extra ids (default 32000)")
  parser.add_argument("--out", help="output directory (gets sentencepiece.model)")
  parser.add_argument("--text_key", default="text", help="JSON field holding the text")
  parser.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
  parser.add_argument("--character_coverage", type=float, default=0.9995,
                      help="fraction of characters covered (use 1.0 for small alphabets)")
  parser.add_argument("--max_sentences", type=int, default=2_000_000,
                      help="lines sampled for training")
  parser.add_argument("--embedded", action="store_true",
                      help="build the embedded corpus and its vocabulary instead")


def run(args: argparse.Namespace) -> int:
  # TensorFlow and SentencePiece load only once the flags parse: `--help` stays fast.
  # pylint: disable-next=import-outside-toplevel
  from switch_jax.data import corpus, sources, vocabularies

  start = time.time()
  if args.embedded:
    built = corpus.embedded_corpus()
    print(f"embedded corpus: {built.directory}")
    print(json.dumps(built.stats, indent=2))
    return 0
  if not args.input or not args.out:
    raise UserError("give --input FILE... and --out DIR (or --embedded)")
  files = sources.checked_text_files(tuple(args.input), args.text_key)
  vocab = vocabularies.train_sentencepiece(
      files, args.vocab_size, args.out, text_key=args.text_key, model_type=args.model_type,
      character_coverage=args.character_coverage, max_sentences=args.max_sentences)
  print(f"{vocab.sentencepiece_model_file}: {vocab.vocab_size - vocab.extra_ids} pieces + "
        f"{vocab.extra_ids} extra ids = {vocab.vocab_size} ids ({time.time() - start:.1f} s)")
  print("use it in gin, e.g.:")
  print(f"  local_vocabulary_path.path = '{vocab.sentencepiece_model_file}'")
  return 0
