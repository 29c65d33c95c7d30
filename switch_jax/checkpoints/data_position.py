"""The `data/` item of a training checkpoint: each host's place in its input stream.

    checkpoints/<step>/data/process_00000-of-00002
    checkpoints/<step>/data/process_00001-of-00002

One file per process, written by that process: the bytes its iterator gave
when the step was saved (`switch_jax.data.iterator_state`), captured before
the save started, so the write may finish in the background with the
arrays. The item lives inside the step directory that orbax finalizes as a
whole, so a step that exists has every host's file or none.

A restore reads only this process's file, named for this run's process
count: after a change of host count there is none, and the caller falls
back to replaying the input (see `iterator_state`).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

ITEM = "data"


def file_name(process_index: int, process_count: int) -> str:
  return f"process_{process_index:05d}-of-{process_count:05d}"


@dataclasses.dataclass(frozen=True)
class SavedPosition:
  """What a restore found in a step's `data/` item.

  Attributes:
    state: this process's bytes, None when the step holds no file for it.
    files: the names of every file the item holds (what hosts saved it).
  """

  state: Optional[bytes]
  files: tuple[str, ...]

  def host_counts(self) -> list[int]:
    """The process counts the files were saved for (one, normally)."""
    return sorted({int(name.rsplit("-of-", 1)[1]) for name in self.files if "-of-" in name})


class DataPositionHandler(ocp.AsyncCheckpointHandler):
  """Writes and reads one process's iterator bytes (an orbax item handler)."""

  def _write(self, directory: epath.Path, args: "DataPositionSave") -> None:
    (directory / file_name(args.process_index, args.process_count)).write_bytes(args.state)

  async def _write_later(self, directory: epath.Path, args: "DataPositionSave") -> None:
    self._write(directory, args)

  async def async_save(self, directory: epath.Path, args: "DataPositionSave"
                       ) -> Optional[List[ocp.future.Future]]:
    # Waits for orbax's (possibly asynchronous) creation of the item
    # directory before writing into it.
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        self._write_later(directory, args), name="data_position_save")]

  def save(self, directory: epath.Path, args: "DataPositionSave") -> None:
    self._write(directory, args)

  def restore(self, directory: epath.Path, args: Optional["DataPositionRestore"] = None
              ) -> SavedPosition:
    args = args or DataPositionRestore()
    path = directory / file_name(args.process_index, args.process_count)
    files = tuple(sorted(p.name for p in directory.iterdir()))
    return SavedPosition(path.read_bytes() if path.name in files else None, files)


@ocp.args.register_with_handler(DataPositionHandler, for_save=True)
@dataclasses.dataclass
class DataPositionSave(ocp.args.CheckpointArgs):
  """This process's iterator bytes, and which process of how many it is."""

  state: bytes
  process_index: int = dataclasses.field(default_factory=jax.process_index)
  process_count: int = dataclasses.field(default_factory=jax.process_count)


@ocp.args.register_with_handler(DataPositionHandler, for_restore=True)
@dataclasses.dataclass
class DataPositionRestore(ocp.args.CheckpointArgs):
  """Which process's file to read."""

  process_index: int = dataclasses.field(default_factory=jax.process_index)
  process_count: int = dataclasses.field(default_factory=jax.process_count)
