"""Notices a lost host of a multi-process run and stops this one in one line.

When one process of a pod dies (SIGKILL, its VM gone), the others wait in
their next collective: XLA's CPU (gloo) and TPU collectives have no timeout.
JAX's coordination service does notice the missing heartbeats, but then
aborts every process from C++ (SIGABRT, a stack trace, no step to resume
from), and its Python hook for that moment cannot be used from jaxlib 0.10
(the callback's status does not convert: std::bad_cast, terminate).

So each process keeps a heartbeat of its own in the coordination service's
key-value store, a counter it bumps every `timeout / 5` seconds from a
daemon thread, and watches the others' counters. A counter that stands
still for `timeout` seconds, or a coordinator that does not answer for as
long, ends this process with LOST_PROCESS_EXIT after printing which process
was lost and where a re-run resumes. JAX's own heartbeat timeout is set
longer (JAX_BACKSTOP), so this one speaks first.

A host that dies mid-collective can also fail the others' collective at
once (gloo: "Connection reset by peer"), before its heartbeat is overdue;
the error then unwinds this process toward JAX's shutdown barrier, where
JAX's backstop aborts it. `await_lost_host` is for that moment: the CLI
calls it with such an error, and it waits for the watch's verdict.

Nothing is saved on the way out: the newest complete checkpoint stays as it
was, and a save in flight stays a temporary directory, which the next run's
checkpointer removes (orbax finalizes a step only after every process has
written its part).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Callable, Optional

# EX_TEMPFAIL, "try again": a re-run of the same command resumes.
LOST_PROCESS_EXIT = 75
_KEY = "switch_jax/heartbeat"
# The errors a collective raises when a peer is gone (XlaRuntimeError is
# JaxRuntimeError's older name); matched by name to keep jax out of this module.
_RUNTIME_ERRORS = ("JaxRuntimeError", "XlaRuntimeError")
_active: Optional["HostWatchdog"] = None


def jax_backstop(timeout: int) -> int:
  """JAX's own heartbeat timeout for ours: long enough that ours fires first."""
  return 2 * timeout + 10


class HostWatchdog:
  """Heartbeats of this process, and a watch on every other one's.

  `client` is a jax DistributedRuntimeClient (key_value_set,
  key_value_try_get); `lost(what)` is called once, from the watch thread,
  with e.g. "process 1" or "the coordinator (process 0)", and is expected
  to end the process.
  """

  def __init__(self, client, process_id: int, num_processes: int, timeout: float,
               lost: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
    self.client, self.process_id, self.timeout, self.lost = client, process_id, timeout, lost
    self.others = [p for p in range(num_processes) if p != process_id]
    self.interval = max(0.05, timeout / 5)
    self._clock = clock
    now = clock()
    # Per other process: (its last counter, when it last changed, on our clock).
    self._seen: dict[int, tuple[Optional[str], float]] = {p: (None, now) for p in self.others}
    self._answered = now  # the coordinator's last answer
    self._done: set[int] = set()
    self._beats = 0
    self._stop = threading.Event()
    self._fired = False

  def beat(self) -> None:
    """One round: bump our counter, read the others'. Raises if the
    coordinator does not answer."""
    self._beats += 1
    self.client.key_value_set(f"{_KEY}/{self.process_id}", str(self._beats),
                              allow_overwrite=True)
    now = self._clock()
    for other in self.others:
      if other in self._done:
        continue
      if self._try_get(f"{_KEY}/done/{other}") is not None:
        self._done.add(other)  # finished its run: no longer expected to beat
        continue
      value = self._try_get(f"{_KEY}/{other}")
      if value != self._seen[other][0]:
        self._seen[other] = (value, now)
    self._answered = now

  def _try_get(self, key: str) -> Optional[str]:
    try:
      return self.client.key_value_try_get(key)
    except Exception as e:  # pylint: disable=broad-except
      if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
        return None
      raise

  def check(self, paused_for: float = 0.0) -> Optional[str]:
    """What is lost now ("process 1", "the coordinator (process 0)"), or None.

    `paused_for`: how much longer than an interval this process itself went
    unscheduled (SIGSTOP, a suspended VM); the others' silence over that
    time is not theirs, so their clocks restart.
    """
    now = self._clock()
    if paused_for > 0:
      self._answered = now
      self._seen = {p: (value, now) for p, (value, _) in self._seen.items()}
      return None
    if now - self._answered > self.timeout:
      return "the coordinator (process 0)" if self.process_id else "the coordinator"
    silent = [p for p, (_, since) in self._seen.items()
              if p not in self._done and now - since > self.timeout]
    if silent:
      return "process" + "es" * (len(silent) > 1) + " " + ", ".join(map(str, silent))
    return None

  def start(self) -> "HostWatchdog":
    global _active  # pylint: disable=global-statement  # one watch per process
    _active = self
    threading.Thread(target=self._beat_loop, name="switch-jax-heartbeat", daemon=True).start()
    threading.Thread(target=self._watch_loop, name="switch-jax-host-watch", daemon=True).start()
    atexit.register(self.finish)
    return self

  def finish(self) -> None:
    """This process is done: the others stop expecting its heartbeat."""
    if self._stop.is_set():
      return
    self._stop.set()
    try:
      self.client.key_value_set(f"{_KEY}/done/{self.process_id}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # the coordinator is gone already
      pass

  def _beat_loop(self) -> None:
    while not self._stop.wait(self.interval):
      try:
        self.beat()
      except Exception:  # pylint: disable=broad-except  # the watch judges the silence
        pass

  def _watch_loop(self) -> None:
    last = self._clock()
    while not self._stop.wait(self.interval):
      now = self._clock()
      lost = self.check(paused_for=max(0.0, now - last - 3 * self.interval))
      last = now
      if lost is not None and not self._stop.is_set() and not self._fired:
        self._fired = True
        self.lost(lost)


def await_lost_host(error: BaseException) -> None:
  """After `error` escaped a multi-process run: when it is a runtime error
  (a collective that failed, perhaps because a host died) and a watch runs,
  waits until the watch could have named a lost host, `timeout` and three
  intervals, so that its `lost` ends the process with the one line. Returns
  at once for other errors or without a watch; after the wait when nobody
  is lost (the error is then a real one, for the caller to raise)."""
  watch = _active
  if watch is None or watch._stop.is_set() or type(error).__name__ not in _RUNTIME_ERRORS:
    return
  deadline = time.monotonic() + watch.timeout + 3 * watch.interval
  while not watch._fired and time.monotonic() < deadline:
    time.sleep(min(watch.interval, 0.1))


def stop_for_lost(process_id: int, what: str, timeout: float, resume_hint: str) -> None:
  """Prints the one line and ends this process at once (no cleanup: the
  collectives it is in will never return)."""
  print(f"switch-jax: error: process {process_id} lost {what}: no heartbeat for {timeout:g} s "
        f"(--heartbeat_timeout); stopping with exit status {LOST_PROCESS_EXIT}. {resume_hint}",
        file=sys.stderr, flush=True)
  try:
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  os._exit(LOST_PROCESS_EXIT)  # pylint: disable=protected-access
