#!/usr/bin/env bash
# Train on a Cloud TPU slice: create it (or reuse a READY one), set up every
# worker (uv, a virtualenv ~/switch-jax-venv with a Python >= 3.11, the
# package and jax[tpu] in it), and run the same `switch-jax train
# --distributed` on all workers with the venv's Python. See docs/pod.md.
#
# Set these variables (in the environment or on the command line):
#   TPU_NAME          the slice's name, e.g. switch-base-8
#   ZONE              e.g. us-central2-b
#   PROJECT           your Google Cloud project ID
#   ACCELERATOR_TYPE  e.g. v4-32
#   RUNTIME_VERSION   TPU software version (default tpu-ubuntu2204-base)
#   BUCKET            a bucket name or gs://BUCKET; gives the defaults below
#   MODEL_DIR         default gs://$BUCKET/runs/$TPU_NAME
#   TFDS_DATA_DIR     default gs://$BUCKET/tfds
#   GIN_FILES         space-separated, in order, e.g.
#                     "models/switch_base_8.gin runs/pretrain.gin mesh/expert_parallel.gin"
#   GIN_BINDINGS      optional, one NAME=VALUE gin binding per line
#   PACKAGE           a wheel or sdist path, a git+https:// URL or a requirement
#   REMOTE_PYTHON     the Python the workers' venv is made with, as uv's --python
#                     takes it: 3.12, a range, or an interpreter (default >=3.11,<3.14;
#                     uv uses one the worker has, else installs one)
#   SPOT=1 | PREEMPTIBLE=1   create a spot (or preemptible) slice
#   SKIP_INSTALL=1    the workers already have the package
#   DELETE=1          delete the slice after training
#   DRY_RUN           1 (the default): print the commands; 0: run them
#   PYTHON            the local Python that runs `switch-jax launch` (default python3)
# Arguments are passed on to `switch-jax launch tpu`, e.g.
#   --gin TRAIN_STEPS=100000 --gin 'MIXTURE_OR_TASK_NAME="c4_span_corruption"'
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"

: "${TPU_NAME:?set TPU_NAME, the TPU slice name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${PROJECT:?set PROJECT, your Google Cloud project ID}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v4-32}"
: "${GIN_FILES:?set GIN_FILES, e.g. models/switch_base_8.gin runs/pretrain.gin}"
bucket="${BUCKET:-}"
bucket="${bucket#gs://}"
bucket="${bucket%/}"
if [[ -z "${MODEL_DIR:-}" || -z "${TFDS_DATA_DIR:-}" ]]; then
  : "${BUCKET:?set BUCKET (or both MODEL_DIR and TFDS_DATA_DIR)}"
fi

args=(tpu
  --name "${TPU_NAME}"
  --zone "${ZONE}"
  --project "${PROJECT}"
  --accelerator_type "${ACCELERATOR_TYPE}"
  --runtime_version "${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
  --model_dir "${MODEL_DIR:-gs://${bucket}/runs/${TPU_NAME}}"
  --tfds_data_dir "${TFDS_DATA_DIR:-gs://${bucket}/tfds}")
if [[ -n "${REMOTE_PYTHON:-}" ]]; then
  args+=(--python "${REMOTE_PYTHON}")
fi
read -r -a gin_files <<< "${GIN_FILES}"
for gin_file in "${gin_files[@]}"; do
  args+=(--gin_file "${gin_file}")
done
while IFS= read -r binding; do
  if [[ -n "${binding}" ]]; then
    args+=(--gin "${binding}")
  fi
done <<< "${GIN_BINDINGS:-}"
if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then
  args+=(--skip_install)
else
  args+=(--package "${PACKAGE:?set PACKAGE (a wheel, sdist, git+https:// URL or requirement) or SKIP_INSTALL=1}")
fi
if [[ "${SPOT:-0}" == 1 ]]; then
  args+=(--spot)
fi
if [[ "${PREEMPTIBLE:-0}" == 1 ]]; then
  args+=(--preemptible)
fi
if [[ "${DELETE:-0}" == 1 ]]; then
  args+=(--delete)
fi
if [[ "${DRY_RUN:-1}" != 0 ]]; then
  args+=(--dry_run)
fi

exec "${PYTHON:-python3}" -m switch_jax.cli.main launch "${args[@]}" "$@"
