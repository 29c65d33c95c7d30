"""Where the gin files live: installed beside the package, or in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # switch_jax/, from switch_jax/cli/


def gin_dir() -> Path:
  """The folder holding models/, runs/, precision/ and mesh/ gin files."""
  installed = _PACKAGE / "gin_files"  # a wheel install (setup.py maps gin/ here)
  if installed.is_dir():
    return installed
  checkout = _PACKAGE.parent / "gin"  # a source checkout or an editable install
  if checkout.is_dir():
    return checkout
  raise FileNotFoundError(f"no gin files found at {installed} or {checkout}")
