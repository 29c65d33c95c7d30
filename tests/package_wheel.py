"""A wheel of this checkout, for the tests that install the package the way
a TPU worker does (tests/cli/test_worker_setup.py, test_pod_simulation.py).

It is built from a copy of the sources, since a build in the checkout would
write build/ there, and with uv rather than pip: a venv that uv made (CI's
second Python) has no pip.
"""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_NAME = "switch_jax-0.1.0-py3-none-any.whl"


def build(tmp_path_factory) -> Path:
  """Builds the wheel under pytest's temporary folders and returns its path."""
  source = tmp_path_factory.mktemp("source")
  for name in ("setup.py", "README.md", "LICENSE"):
    shutil.copy(REPO / name, source / name)
  for name in ("switch_jax", "tasks", "gin"):
    shutil.copytree(REPO / name, source / name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  dist = tmp_path_factory.mktemp("dist")
  subprocess.run([sys.executable, "-m", "uv", "build", "--wheel", "--quiet", "--out-dir",
                  str(dist), str(source)], check=True)
  return dist / WHEEL_NAME
