"""A failed checkpoint save reads as one line, not pages of tracebacks.

When a save fails (a full disk, a bucket that refuses), the run reports it
itself, in one line (`TrainCheckpointer._save_failed`). Orbax and
tensorstore also report it, several times over:
  - orbax logs the error with its traceback from each background thread
    (the "absl" logger);
  - asyncio logs "Task exception was never retrieved" with a traceback for
    each write orbax abandoned (the "asyncio" logger, when they are
    garbage-collected);
  - tensorstore completes each abandoned write into the event loop orbax
    already closed, and prints the RuntimeError("Event loop is closed")
    raised there, one traceback per array (hundreds for a model).
`install()` keeps the log lines but drops the tracebacks of records whose
exception passed through orbax or tensorstore, and drops that last
RuntimeError. Everything else passes unchanged.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Optional

_LIBRARIES = ("/orbax/", "/tensorstore/")
_installed = False


def _from_checkpoint_libraries(traceback: Optional[types.TracebackType]) -> bool:
  while traceback is not None:
    if any(lib in traceback.tb_frame.f_code.co_filename for lib in _LIBRARIES):
      return True
    traceback = traceback.tb_next
  return False


class _NoLibraryTracebacks(logging.Filter):
  """Keeps a record, minus the traceback of an orbax/tensorstore error."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and (any(lib in record.pathname for lib in _LIBRARIES)
                            or _from_checkpoint_libraries(record.exc_info[2])):
      record.exc_info, record.exc_text = None, None
    return True


def _closed_loop(value: BaseException, traceback: Optional[types.TracebackType]) -> bool:
  """The RuntimeError of a callback into an asyncio loop already closed."""
  if not isinstance(value, RuntimeError) or str(value) != "Event loop is closed":
    return False
  while traceback is not None:
    if traceback.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    traceback = traceback.tb_next
  return False


def install() -> None:
  """Installs the filters and hooks (once)."""
  global _installed  # pylint: disable=global-statement
  if _installed:
    return
  _installed = True
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_NoLibraryTracebacks())
  previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

  def excepthook(kind, value, traceback):
    if not _closed_loop(value, traceback):
      previous_excepthook(kind, value, traceback)

  def unraisablehook(unraisable):
    if not _closed_loop(unraisable.exc_value, unraisable.exc_traceback):
      previous_unraisablehook(unraisable)

  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
