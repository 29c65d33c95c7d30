"""Reading a Hugging Face model directory's tensors without running its code.

Safetensors (single or sharded with `model.safetensors.index.json`) are read
with the safetensors library; `pytorch_model.bin` (single or sharded) only
with `torch.load(weights_only=True)`, which refuses any pickled object that
is not a plain tensor, so a malicious checkpoint cannot execute code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from switch_jax.errors import UserError


def read_weights(directory) -> dict[str, np.ndarray]:
  """Every tensor of a HF model directory as numpy, never unpickling code.

  Reads model.safetensors, sharded safetensors (model.safetensors.index.json),
  or pytorch_model.bin (and its sharded index) with
  `torch.load(weights_only=True)`.
  """
  directory = Path(directory)
  for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                             ("pytorch_model.bin.index.json", "pytorch_model.bin")):
    index = directory / index_name
    if index.is_file():
      try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index}: not a valid weight index ({e!r})") from None
      files = [directory / s for s in shards]
    elif (directory / single).is_file():
      files = [directory / single]
    else:
      continue
    state = {}
    for file in files:
      if not file.is_file():
        raise UserError(f"{file}: shard listed in {index_name} is missing")
      state.update(_read_safetensors(file) if file.suffix == ".safetensors"
                   else _read_torch_bin(file))
    return state
  raise UserError(f"{directory}: no weights found (looked for model.safetensors, "
                  "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)")


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
  try:
    with safe_open(str(file), framework="numpy") as f:
      return {key: f.get_tensor(key) for key in f.keys()}
  except Exception as e:  # safetensors raises its own error types for damaged files
    raise UserError(f"{file}: cannot read safetensors ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _read_torch_bin(file: Path) -> dict[str, np.ndarray]:
  try:  # PyTorch is optional: only pytorch_model.bin files need it
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(f"{file}: reading pytorch_model.bin needs PyTorch (pip install torch); "
                    "or convert the checkpoint to safetensors") from None
  try:
    state = torch.load(str(file), map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError, RuntimeError, ...: anything not plain tensors
    first = str(e).splitlines()[0][:160] if str(e) else ""
    raise UserError(f"{file}: not loadable with torch.load(weights_only=True) "
                    f"({type(e).__name__}: {first}); refusing to unpickle arbitrary objects, "
                    "re-save it as safetensors") from None
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise UserError(f"{file}: expected a dict of tensors (a state dict)")
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}
