"""What `switch-jax launch tpu` says when training on the slice fails.

`gcloud ... ssh --worker=all` fails when any worker's trainer fails, and its
own words are one exit status. The trainers say more, on the lines that
come back through ssh: a survivor of a lost host prints "switch-jax: error:
process 0 lost process 1: ..." (cli/host_watchdog.py), other errors
"switch-jax train: error: ...". A host killed outright (SIGKILL, out of
memory, its VM gone) says nothing itself; the others name it. The launcher
keeps those lines while passing everything through, then sums up: which
process was lost or failed, and the step a re-run resumes from (the newest
complete checkpoint in MODEL_DIR, read here on a shared file system, else
the one the trainers named). A slice that went PREEMPTED meanwhile is
refused by the re-run itself, with the delete command to run first.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import threading
from typing import Iterable, Optional, Sequence

_LOST_RE = re.compile(r"switch-jax: error: process (\d+) lost (.+?): no heartbeat for")
_ERROR_RE = re.compile(r"(switch-jax(?: \w+)?: error: .*)")
_RESUME_RE = re.compile(r"resume from step (\d+)")
_KEPT_LINES = 2000


def stream(argv: Sequence[str]) -> tuple[int, list[str]]:
  """Runs `argv` (no shell), passing its stdout and stderr through line by
  line as they come; returns (its exit status, its last lines)."""
  proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          errors="replace", bufsize=1)
  kept = collections.deque(maxlen=_KEPT_LINES)
  lock = threading.Lock()

  def pump(source, sink):
    for line in source:
      sink.write(line)
      sink.flush()
      with lock:
        kept.append(line.rstrip("\n"))
  pumps = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout)),
           threading.Thread(target=pump, args=(proc.stderr, sys.stderr))]
  for thread in pumps:
    thread.start()
  status = proc.wait()
  for thread in pumps:
    thread.join()
  return status, list(kept)


def newest_step(model_dir: str) -> Optional[int]:
  """The newest complete checkpoint's step in `model_dir`, a shared file
  system's path; None when there is none, or for a bucket (gs://), which the
  launcher leaves to the trainers (this machine may have no credentials)."""
  if not model_dir.startswith("/"):
    return None
  try:
    from switch_jax.checkpoints import model_format  # pylint: disable=import-outside-toplevel
    return model_format.resolve(model_dir).step
  except Exception:  # pylint: disable=broad-except  # any reason: the trainers' word is next
    return None


def report(*, name: str, status: int, lines: Iterable[str], step: Optional[int]) -> str:
  """The summary lines after the training command failed with `status`."""
  lost, errors, named_step = {}, [], None
  for line in lines:
    found = _LOST_RE.search(line)
    if found:
      lost.setdefault(found.group(2), []).append(found.group(1))
    else:
      error = _ERROR_RE.search(line)
      if error and error.group(1) not in errors:
        errors.append(error.group(1))
    resume = _RESUME_RE.search(line)
    if resume:
      named_step = int(resume.group(1))
  out = [f"training on slice {name} failed: the ssh command exited with status {status}."]
  for what, survivors in lost.items():
    workers = re.sub(r"process(es)? ([\d, ]+)", lambda m: f"{m.group(0)} (worker"
                     f"{'s' * bool(m.group(1))} {m.group(2)})", what)
    out.append(f"{workers} stopped answering: killed (SIGKILL, out of memory) or its VM gone, "
               f"so it said nothing; process{'es' * (len(set(survivors)) > 1)} "
               f"{', '.join(sorted(set(survivors), key=int))} stopped on losing it (exit "
               "status 75).")
  out += [f"a trainer said: {line}" for line in errors[:3]]
  if not lost and not errors:
    out.append("no trainer said why: the workers' last lines above (and gcloud's) do.")
  resume_at = step if step is not None else named_step
  where = (f"from step {resume_at}, the newest complete checkpoint" if resume_at is not None
           else "from the newest complete checkpoint in the model dir, if any (else from the "
                "start)")
  out.append(f"re-run the same command to resume {where}.")
  return "\n".join(f"switch-jax launch: {line}" for line in out)
