"""Gin files, installed as `switch_jax.gin_files` (see setup.py)."""
