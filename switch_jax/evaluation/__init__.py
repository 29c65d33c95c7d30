"""Decoding (greedy and beam search, `decoding`) and evaluation: validation
loss, seqio task metrics on decoded outputs and JSONL inference (`evaluator`).
"""
