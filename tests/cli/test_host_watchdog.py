"""The lost-host watch (cli/host_watchdog.py) on a made-up key-value store
and clock: which silence it reports, and which it forgives."""

import time

import pytest

from switch_jax.cli import host_watchdog
from switch_jax.cli.commands import gin_flags
from switch_jax.errors import UserError


class Store:
  """The coordination service's key-value store, as far as the watch uses it."""

  def __init__(self):
    self.values, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
    assert allow_overwrite or key not in self.values
    self.values[key] = value

  def key_value_try_get(self, key):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
    if key not in self.values:
      raise RuntimeError(f"NOT_FOUND: Config key {key} not found")
    return self.values[key]


class Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _pod(num_processes=3, timeout=10.0):
  store, clock = Store(), Clock()
  watches = [host_watchdog.HostWatchdog(store, i, num_processes, timeout, lost=None,
                                        clock=clock) for i in range(num_processes)]
  return store, clock, watches


def _round(clock, watches, seconds, beating):
  clock.now += seconds
  for i in beating:
    watches[i].beat()
  return [w.check() for w in watches]


def test_a_silent_process_is_reported_after_the_timeout_and_not_before():
  _, clock, watches = _pod()
  for _ in range(5):  # all beat every 2 s: nothing is lost
    assert _round(clock, watches, 2, beating=range(3)) == [None, None, None]
  last_beat = clock.now
  # Process 2 stops beating (killed). The others see a counter change one
  # round late at most, so they name it after the timeout, within two beats more.
  reports = []
  while not reports[-1:] or reports[-1] == [None, None]:
    reports.append(_round(clock, watches, 2, beating=(0, 1))[:2])
  assert reports[-1] == ["process 2", "process 2"]
  assert 10 < clock.now - last_beat <= 10 + 2 * watches[0].interval
  assert watches[0].interval == 2.0  # a fifth of the timeout


def test_two_silent_processes_are_named_together():
  _, clock, watches = _pod(num_processes=3, timeout=4)
  _round(clock, watches, 1, beating=range(3))
  for _ in range(4):
    _round(clock, watches, 1.5, beating=(0,))
  assert watches[0].check() == "processes 1, 2"


def test_a_coordinator_that_stops_answering_is_reported():
  store, clock, watches = _pod(num_processes=2)
  _round(clock, watches, 2, beating=(0, 1))
  store.down = True
  for _ in range(5):
    clock.now += 2
    with pytest.raises(RuntimeError, match="UNAVAILABLE"):
      watches[1].beat()
  assert watches[1].check() is None  # 10 s: not yet
  clock.now += 1
  assert watches[1].check() == "the coordinator (process 0)"


def test_a_finished_process_is_not_waited_for():
  _, clock, watches = _pod(num_processes=2)
  _round(clock, watches, 2, beating=(0, 1))
  watches[1].finish()  # at exit: its run is done
  watches[1].finish()  # twice is harmless
  for _ in range(10):
    assert _round(clock, watches, 2, beating=(0,))[0] is None


def test_our_own_pause_is_not_taken_for_the_others_silence():
  _, clock, watches = _pod(num_processes=2)
  _round(clock, watches, 2, beating=(0, 1))
  clock.now += 60  # process 0 was stopped (SIGSTOP) for a minute; 1 kept beating
  watches[1].beat()
  assert watches[0].check(paused_for=58) is None  # the others' clocks restart
  watches[0].beat()
  assert watches[0].check() is None
  clock.now += 11  # and from then on, silence counts again
  watches[0].beat()
  assert watches[0].check() == "process 1"


def test_jax_gives_a_process_up_only_after_the_watch_has():
  assert host_watchdog.jax_backstop(10) > 10
  assert host_watchdog.jax_backstop(100) == 210


def test_the_lost_line_names_the_process_the_timeout_and_the_exit_status(capsys, monkeypatch):
  exits = []
  monkeypatch.setattr(host_watchdog.os, "_exit", exits.append)
  host_watchdog.stop_for_lost(0, "process 1", 10, "Re-run the same command.")
  assert exits == [75]
  assert capsys.readouterr().err == (
      "switch-jax: error: process 0 lost process 1: no heartbeat for 10 s "
      "(--heartbeat_timeout); stopping with exit status 75. Re-run the same command.\n")


def test_the_heartbeat_timeout_must_be_positive():
  parser = __import__("argparse").ArgumentParser()
  gin_flags.add_gin_arguments(parser)
  args = parser.parse_args(["--distributed", "--heartbeat_timeout=0"])
  args.gin_bindings = []
  with pytest.raises(UserError, match="--heartbeat_timeout must be positive, got 0"):
    gin_flags.setup(args)
  assert parser.parse_args([]).heartbeat_timeout == 100  # JAX's own default


class JaxRuntimeError(RuntimeError):
  """Named as jax's: what a collective raises when its peer is gone."""


def test_a_collective_error_is_held_until_the_watch_names_the_lost_host():
  # Seen in CI: gloo failed the survivor's all-to-all at once ("Connection
  # reset by peer"); the error unwound to JAX's shutdown barrier, and JAX's
  # backstop aborted the process (SIGABRT, a stack trace) instead of the line.
  lost = []
  watch = host_watchdog.HostWatchdog(Store(), 0, 2, 0.5, lost=lost.append).start()
  try:
    start = time.monotonic()
    host_watchdog.await_lost_host(JaxRuntimeError("Gloo all-to-all failed: Connection reset"))
    assert lost == ["process 1"]  # it never beat
    assert time.monotonic() - start < 0.5 + 3 * 0.1 + 0.5
  finally:
    watch.finish()


def test_other_errors_and_a_healthy_pod_are_not_held():
  store, lost = Store(), []
  watches = [host_watchdog.HostWatchdog(store, i, 2, 0.5, lost=lost.append)
             for i in (1, 0)]
  for watch in watches:
    watch.start()
  try:
    start = time.monotonic()
    host_watchdog.await_lost_host(ValueError("a bug of ours"))
    assert time.monotonic() - start < 0.05
    host_watchdog.await_lost_host(JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"))
    assert lost == [] and time.monotonic() - start >= 0.5  # waited, then left it to raise
  finally:
    for watch in watches:
      watch.finish()
