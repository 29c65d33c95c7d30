"""The TPU worker set-up, run for real on a made-up fresh worker.

tpu-ubuntu2204-base's `python3` is 3.10 and the package needs >= 3.11. Here
a temporary home folder plays a worker's, and its PATH has only bash and
pyenv's 3.10 as `python3` (plus, where the case says so, a `python3.11`).
The test runs the exact `--command` that `switch-jax launch tpu` sends over
ssh, with the wheel where `gcloud ... scp` puts it (the home folder).

Exercised: pip installing uv for the user from the registry (as on a real
worker), uv finding the worker's Python >= 3.11 and making the venv with
it, the wheel with its `tpu` extra installed in the venv, the entry point
running from there, a re-run keeping the venv, and uv turning to a
download when the worker has no Python >= 3.11.
Not exercised: the package's dependencies (jax[tpu], TensorFlow, ...: a
uv.toml with `no-deps` keeps the install to the wheel, seconds instead of
minutes; the tpu extra's pins are read from the installed metadata
instead), and a Python download itself: nothing but package registries
is reachable here, so a file:// mirror stands in for python-build-standalone
and shows which build uv asked for.
"""

import glob
import os
import shutil
import subprocess

import pytest

import package_wheel

from switch_jax.cli import launch

VENV = launch.WORKER_VENV


def _pyenv_python(version: str) -> str:
  root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
  found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", "python3")))
  if not found:
    pytest.skip(f"needs pyenv's Python {version} ({root}/versions/{version}.*) to play "
                "tpu-ubuntu2204-base's python3")
  return found[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  return package_wheel.build(tmp_path_factory)


@pytest.fixture(scope="module")
def pip_cache(tmp_path_factory):
  """One pip cache for this module's workers: uv is downloaded once."""
  return tmp_path_factory.mktemp("pip-cache")


def _worker(tmp_path, pip_cache, wheel, *, newer_python=True):
  """(home, env) of a fresh worker whose python3 is 3.10."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  home.mkdir()
  bin_dir.mkdir()
  (bin_dir / "python3").symlink_to(_pyenv_python("3.10"))
  (bin_dir / "bash").symlink_to(shutil.which("bash"))
  if newer_python:
    (bin_dir / "python3.11").symlink_to(_pyenv_python("3.11"))
  shutil.copy(wheel, home / package_wheel.WHEEL_NAME)
  (tmp_path / "uv.toml").write_text("[pip]\nno-deps = true\n")
  env = {"HOME": str(home), "PATH": str(bin_dir), "LANG": "C.UTF-8",
         "PIP_CACHE_DIR": str(pip_cache), "UV_CONFIG_FILE": str(tmp_path / "uv.toml"),
         # Any Python download fails here, and names the build it wanted.
         "UV_PYTHON_INSTALL_MIRROR": (tmp_path / "mirror").as_uri()}
  for name in ("PIP_CONFIG_FILE", "PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT"):
    if name in os.environ:
      env[name] = os.environ[name]
  return home, env


def _set_up(home, env):
  """Runs the launcher's set-up command as a worker's ssh session would."""
  ssh = launch.tpu_install_commands("my-tpu", "us-central2-b", "my-project",
                                    f"dist/{package_wheel.WHEEL_NAME}")[-1]
  command = launch.Step("install", ssh).remote_command
  return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


@pytest.fixture
def in_dist(tmp_path, wheel, monkeypatch):
  """The launcher checks that the wheel it uploads exists: run it beside one."""
  launcher = tmp_path / "launcher"
  (launcher / "dist").mkdir(parents=True)
  shutil.copy(wheel, launcher / "dist" / package_wheel.WHEEL_NAME)
  monkeypatch.chdir(launcher)


def _run(home, env, *argv):
  return subprocess.run(list(argv), cwd=home, env=env, capture_output=True, text=True,
                        timeout=120, check=False)


def test_a_fresh_worker_gets_a_venv_with_python_3_11_and_the_package(
    tmp_path, pip_cache, wheel, in_dist):
  home, env = _worker(tmp_path, pip_cache, wheel)
  assert _run(home, env, "python3", "--version").stdout.startswith("Python 3.10.")
  result = _set_up(home, env)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (home / ".local" / "bin" / "uv").is_file()  # pip put uv in the user's bin
  python = home / VENV / "bin" / "python"
  version = _run(home, env, str(python), "-c", "import sys; print(sys.version_info[:2])")
  assert version.stdout == "(3, 11)\n"
  # The worker's own python3.11, not a download: the mirror was never read.
  assert f"interpreter at: {tmp_path / 'bin' / 'python3.11'}" in result.stderr
  assert not (home / ".local" / "share" / "uv" / "python").exists()
  # The tpu extra is in the installed metadata, pinning jax[tpu].
  requires = _run(home, env, str(python), "-c",
                  "import importlib.metadata as m; print(m.requires('switch-jax'))").stdout
  assert "jax[tpu]==0.10.2; extra == \"tpu\"" in requires
  # The entry point and the module the train command runs, from the venv.
  for argv in ([str(home / VENV / "bin" / "switch-jax"), "--help"],
               [str(python), "-m", "switch_jax.cli.main", "--help"]):
    shown = _run(home, env, *argv)
    assert shown.returncode == 0, shown.stderr
    assert "pretrain or fine-tune a model from gin files" in shown.stdout
  assert launch.worker_python() == f"{VENV}/bin/python"

  # A re-run keeps the venv (a file left in it survives) and reinstalls the package.
  keep = home / VENV / "kept"
  keep.write_text("")
  config_before = (home / VENV / "pyvenv.cfg").read_text()
  again = _set_up(home, env)
  assert again.returncode == 0, again.stdout + again.stderr
  assert keep.exists()
  assert (home / VENV / "pyvenv.cfg").read_text() == config_before
  assert "switch-jax==0.1.0" in again.stderr and "Installed 1 package" in again.stderr


def test_a_worker_without_python_3_11_asks_uv_to_install_one(
    tmp_path, pip_cache, wheel, in_dist):
  home, env = _worker(tmp_path, pip_cache, wheel, newer_python=False)
  result = _set_up(home, env)
  assert result.returncode != 0
  # uv wanted a CPython build within >=3.11,<3.14 (the newest, 3.13) from the mirror.
  output = result.stdout + result.stderr
  assert f"{tmp_path / 'mirror'}/" in output and "cpython-3.13." in output, output
  assert not (home / VENV / "bin" / "python").exists()
