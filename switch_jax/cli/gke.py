"""Kubernetes manifests that train on a TPU slice node pool of GKE
(`switch-jax launch gke`): the same `switch-jax train --distributed` as on
TPU VMs, in one pod per host of the slice.

    switch-jax launch gke --dry_run --name=switch-base-8 --accelerator_type=v5litepod-16 \\
      --image=us-docker.pkg.dev/PROJECT/REPO/switch-jax:0.1.0 --gin_file=... \\
      --model_dir=gs://bucket/run

Two documents: a headless Service and an Indexed Job with completions =
parallelism = the number of hosts. GKE's TPU webhook gives each pod of such
a Job (completionMode Indexed, a subdomain, parallelism > 1, google.com/tpu
requested) TPU_WORKER_ID and TPU_WORKER_HOSTNAMES, the pods' names under the
Service, from which jax.distributed.initialize() finds the others; the
nodeSelector asks for the node pool of the slice's TPU type and topology.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from typing import Mapping, Optional, Sequence

from switch_jax.cli import launch
from switch_jax.errors import UserError

KUBECTL_APPLY = ("kubectl", "apply", "-f", "-")
ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
SPOT_LABEL = "cloud.google.com/gke-spot"
TPU_RESOURCE = "google.com/tpu"
# Time a pod is given to stop after SIGTERM (a deletion, a maintenance
# event): the trainer saves the current step and exits. A Spot node's own
# shutdown notice may be shorter than this.
DEFAULT_GRACE_SECONDS = 300


@dataclasses.dataclass(frozen=True)
class _Generation:
  label: str           # the node label GKE gives the TPU type
  units_per_chip: int  # what one unit of the accelerator type counts: cores (2) or chips (1)
  dims: int            # the topology's rank: 3 (v4, v5p) or 2 (v5e, v6e)
  single_host_chips: int  # the largest slice on one host


# GKE's names for the TPU types (cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus).
GENERATIONS = {
    "v4": _Generation("tpu-v4-podslice", 2, 3, 4),
    "v5p": _Generation("tpu-v5p-slice", 2, 3, 4),
    "v5litepod": _Generation("tpu-v5-lite-podslice", 1, 2, 8),
    "v5e": _Generation("tpu-v5-lite-podslice", 1, 2, 8),
    "v6e": _Generation("tpu-v6e-slice", 1, 2, 8),
}
CHIPS_PER_HOST = 4  # of a multi-host slice, on every generation above


@dataclasses.dataclass(frozen=True)
class SliceShape:
  """A TPU slice as GKE schedules it: `hosts` pods of `chips_per_host` chips
  on the node pool labelled `accelerator` and `topology`."""
  accelerator: str
  topology: str
  hosts: int
  chips_per_host: int


def _default_topology(chips: int, dims: int) -> str:
  """The most even power-of-two grid of `chips`, as GKE spells it: 2x2x1,
  2x2x2, 2x2x4, ... for 3-D slices, 2x2, 2x4, 4x4, ... for 2-D ones."""
  exponent = chips.bit_length() - 1
  sides = [exponent // dims + (i < exponent % dims) for i in range(dims)]
  sides = sorted(2 ** s for s in sides)
  if dims == 3 and sides[0] == 1:
    sides = sides[1:] + [1]  # 2x2x1, not 1x2x2
  return "x".join(str(s) for s in sides)


def slice_shape(accelerator_type: str, topology: Optional[str] = None) -> SliceShape:
  """The GKE shape of e.g. v4-16 (tpu-v4-podslice, 2x2x2, 2 hosts x 4 chips)."""
  match = re.fullmatch(r"(v[0-9]+[a-z]*)-([0-9]+)", str(accelerator_type))
  if not match:
    raise UserError(f"accelerator type {accelerator_type!r}: expected VERSION-SIZE such as "
                    "v4-32, v5p-64 or v5litepod-16")
  generation_name, size = match.groups()
  generation = GENERATIONS.get(generation_name)
  if generation is None:
    raise UserError(f"accelerator type {accelerator_type!r}: GKE TPU node pools here are "
                    f"{', '.join(sorted(GENERATIONS))}")
  chips = int(size) // generation.units_per_chip
  if chips < 1 or chips & (chips - 1):
    raise UserError(f"accelerator type {accelerator_type!r}: {chips} chips; expected a power "
                    "of two")
  if topology is None:
    topology = _default_topology(chips, generation.dims)
  elif not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*){1,2}", topology):
    raise UserError(f"topology {topology!r}: expected e.g. 2x2x2 or 4x4")
  grid = [int(s) for s in topology.split("x")]
  if len(grid) != generation.dims or math.prod(grid) != chips:
    raise UserError(f"topology {topology!r} does not hold the {chips} chips of "
                    f"{accelerator_type} in {generation.dims} dimensions")
  if chips <= generation.single_host_chips:
    return SliceShape(generation.label, topology, 1, chips)
  return SliceShape(generation.label, topology, chips // CHIPS_PER_HOST, CHIPS_PER_HOST)


def container_command(gin_files: Sequence[str], gin_bindings: Mapping[str, launch.GinValue],
                      model_dir: str, tfds_data_dir: Optional[str] = None,
                      extra_flags: Sequence[str] = (), package: Optional[str] = None) -> list[str]:
  """What every pod runs: `python -m switch_jax.cli.main train --distributed
  ...`, after installing `package` (a requirement or git URL, with its tpu
  extra) when the image does not have it."""
  launch.check_shared_path(model_dir, "model dir")
  if tfds_data_dir is not None:
    launch.check_shared_path(tfds_data_dir, "TFDS data dir")
  train = ["python", "-m", "switch_jax.cli.main", "train", "--distributed",
           *launch.trainer_args(gin_files, gin_bindings, model_dir=model_dir,
                                tfds_data_dir=tfds_data_dir, extra_flags=extra_flags)]
  if package is None:
    return train
  if launch.package_kind(package) == "file":
    raise UserError(f"package {package!r}: a pod cannot read a local file; build it into the "
                    "image, or pass a requirement or a git+https:// URL")
  install = ["python", "-m", "pip", "install", launch.with_tpu_extra(package)]
  # exec: the trainer, not bash, gets the SIGTERM that stops a pod.
  return ["bash", "-c", f"{shlex.join(install)} && exec {shlex.join(train)}"]


def manifests(*, name: str, accelerator_type: str, image: str, gin_files: Sequence[str],
              gin_bindings: Mapping[str, launch.GinValue] = None, model_dir: str,
              tfds_data_dir: Optional[str] = None, extra_flags: Sequence[str] = (),
              package: Optional[str] = None, topology: Optional[str] = None,
              spot: bool = False,
              grace_seconds: int = DEFAULT_GRACE_SECONDS) -> list[dict]:
  """[the headless Service, the Indexed Job] that train on one TPU slice."""
  launch.check_tpu_name(name)  # a DNS label, as a Job and a Service need
  if not isinstance(image, str) or not re.fullmatch(r"[\w][\w.:/@+-]*", image):
    raise UserError(f"container image {image!r}: expected a reference such as "
                    "us-docker.pkg.dev/PROJECT/REPO/switch-jax:0.1.0")
  if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, int) or grace_seconds < 0:
    raise UserError(f"the termination grace period must be a whole number of seconds >= 0, "
                    f"got {grace_seconds!r}")
  shape = slice_shape(accelerator_type, topology)
  command = container_command(gin_files, gin_bindings or {}, model_dir, tfds_data_dir,
                              extra_flags, package)
  labels = {"app.kubernetes.io/name": "switch-jax", "app.kubernetes.io/instance": name}
  node_selector = {ACCELERATOR_LABEL: shape.accelerator, TOPOLOGY_LABEL: shape.topology}
  if spot:
    node_selector[SPOT_LABEL] = "true"
  service = {
      "apiVersion": "v1", "kind": "Service",
      "metadata": {"name": name, "labels": dict(labels)},
      # Headless: DNS names NAME-INDEX.NAME for the pods, no load balancing.
      "spec": {"clusterIP": "None", "selector": {"job-name": name}},
  }
  job = {
      "apiVersion": "batch/v1", "kind": "Job",
      "metadata": {"name": name, "labels": dict(labels)},
      "spec": {
          "completionMode": "Indexed",
          "completions": shape.hosts,
          "parallelism": shape.hosts,
          # One host lost stalls the others: fail the Job, and applying it
          # again resumes from the newest checkpoint in the model dir.
          "backoffLimit": 0,
          "template": {
              "metadata": {"labels": dict(labels)},
              "spec": {
                  "subdomain": name,
                  "restartPolicy": "Never",
                  "nodeSelector": node_selector,
                  "terminationGracePeriodSeconds": grace_seconds,
                  "containers": [{
                      "name": "train",
                      "image": image,
                      "command": command,
                      "resources": {"requests": {TPU_RESOURCE: shape.chips_per_host},
                                    "limits": {TPU_RESOURCE: shape.chips_per_host}},
                  }],
              },
          },
      },
  }
  return [service, job]


def to_yaml(documents: Sequence[dict]) -> str:
  """The documents as one YAML stream, as `kubectl apply -f -` reads it."""
  import yaml  # pylint: disable=import-outside-toplevel  # flax depends on PyYAML
  return yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False, width=100)
