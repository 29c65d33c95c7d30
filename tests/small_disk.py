"""A small filesystem that fills: a tmpfs with a size limit, mounted for
one test (mounting needs root; the test skips where mount is refused)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted(directory: Path, kilobytes: int):
  """A tmpfs of `kilobytes` KiB mounted at `directory`; unmounted after."""
  directory.mkdir(parents=True, exist_ok=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs",
                           str(directory)], capture_output=True, text=True, check=False)
  if result.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
  try:
    yield directory
  finally:
    subprocess.run(["umount", "-l", str(directory)], check=False)


def grow(directory: Path, kilobytes: int) -> None:
  """Space is back: the tmpfs at `directory` resized, its files kept."""
  subprocess.run(["mount", "-o", f"remount,size={kilobytes}k", str(directory)], check=True)


def used_kilobytes(directory: Path) -> int:
  """What `directory` takes on a disk (tmpfs gives each small file a page)."""
  return int(subprocess.run(["du", "-sk", str(directory)], capture_output=True, text=True,
                            check=True).stdout.split()[0])
