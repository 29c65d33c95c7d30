"""A persistent XLA compilation cache for tests that start several training
processes on the same programs: the later ones load the compiled steps."""

from pathlib import Path


def env(directory: Path) -> dict:
  """Environment variables that put every compiled program in `directory`."""
  return {"JAX_COMPILATION_CACHE_DIR": str(directory),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
