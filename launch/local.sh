#!/usr/bin/env bash
# Train on this machine's CPU over an emulated mesh of NUM_DEVICES devices.
#
#   launch/local.sh                      # the quickstart (Switch vs dense, ~minutes)
#   GIN_FILES="models/tiny_switch.gin runs/pretrain.gin mesh/cpu8.gin" \
#     MODEL_DIR=/tmp/tiny_switch launch/local.sh --gin TRAIN_STEPS=100 \
#     --gin 'MIXTURE_OR_TASK_NAME="..."' --gin "TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}"
#
# Variables:
#   NUM_DEVICES    devices to emulate (default 8; mesh/cpu8.gin expects 8)
#   GIN_FILES      space-separated gin files, in order; unset: the quickstart
#   GIN_BINDINGS   optional, one NAME=VALUE gin binding per line
#   MODEL_DIR      where a training run writes (required with GIN_FILES unless
#                  a binding sets MODEL_DIR)
#   TFDS_DATA_DIR  where TFDS datasets are prepared (optional)
#   OUTPUT_DIR     the quickstart's output folder (default runs/quickstart)
#   DRY_RUN=1      print the command instead of running it (or pass --dry_run)
#   PYTHON         the Python that runs `switch-jax launch` (default python3)
# Arguments are passed on to `switch-jax launch local`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"

args=(local --num_devices "${NUM_DEVICES:-8}")
if [[ -n "${GIN_FILES:-}" ]]; then
  read -r -a gin_files <<< "${GIN_FILES}"
  for gin_file in "${gin_files[@]}"; do
    args+=(--gin_file "${gin_file}")
  done
  if [[ -n "${MODEL_DIR:-}" ]]; then
    args+=(--model_dir "${MODEL_DIR}")
  fi
  if [[ -n "${TFDS_DATA_DIR:-}" ]]; then
    args+=(--tfds_data_dir "${TFDS_DATA_DIR}")
  fi
else
  args+=(--quickstart)
  if [[ -n "${OUTPUT_DIR:-}" ]]; then
    args+=(--output_dir "${OUTPUT_DIR}")
  fi
fi
while IFS= read -r binding; do
  if [[ -n "${binding}" ]]; then
    args+=(--gin "${binding}")
  fi
done <<< "${GIN_BINDINGS:-}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  args+=(--dry_run)
fi

exec "${PYTHON:-python3}" -m switch_jax.cli.main launch "${args[@]}" "$@"
