"""Converters between other frameworks' checkpoints and ours (see hf.py)."""
