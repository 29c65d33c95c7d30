"""Hugging Face `SwitchTransformersForConditionalGeneration` <-> our parameters.

What is mapped and why (SPEC section 2 lists HF's differences from the paper):
- Capacity: HF keeps the first `expert_capacity` tokens per expert of each
  *sequence*; that is our `group_size=None` (one routing group per
  sequence) with the same explicit `expert_capacity`. Capacity factors do
  not apply then.
- Sparse layout: HF makes block i sparse iff `i % step == 1 or step == 1`,
  step = `num_layers // num_sparse_*_layers` (`num_layers` when 0, 0 gives
  none). `hf_sparse_layers` mirrors that exactly and the import searches for
  the (`sparse_every`, `sparse_offset`) that gives the same layers in both
  stacks, refusing when there is none.
- Router losses: HF adds `coef * (encoder_loss + decoder_loss)`, each stack's
  loss over all its layers' logits at once; ours is `factor * mean over
  layers`. So `factor = coef * (stacks with a Switch layer)` keeps the
  scale. (HF drops the router losses of a stack whose step is 1; a quirk we
  do not copy.)
- Padding: HF 5.x stores `router_ignore_padding_tokens` but routes padding
  anyway. We map the flag as stated; with right padding no real token's
  routing depends on it (padding comes last in every sequence).
- FFN: 'relu' -> 'relu'. 'gated-gelu' -> 'geglu' (gelu_new = tanh GELU) with
  T5's names `wi_0`/`wi_1`; HF's SwitchTransformers has no gated FFN class
  (`ACT2FN['gated-gelu']` is a KeyError), so such checkpoints come from T5
  tooling, and a geglu export cannot be loaded by HF's Switch class.
- Tied embeddings: HF rescales the tied head by d_model^-0.5, as we do. HF
  5.x unties `encoder/decoder.embed_tokens` too when `tie_word_embeddings` is
  false; we keep one token embedding, so those copies must equal `shared`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

import flax.linen as nn
import numpy as np
from flax import traverse_util
from etils import epath
from safetensors.numpy import save_file

from switch_jax import storage
from switch_jax.checkpoints.model_format import atomic_directory, check_shapes, read_json_object
from switch_jax.config import ModelConfig
from switch_jax.checkpoints.weight_files import read_weights
from switch_jax.errors import ConfigError, UserError
from switch_jax.model.layers import ffn_input_names
from switch_jax.model.param_count import abstract_params

MODEL_TYPE = "switch_transformers"
# SwitchTransformersConfig defaults (transformers 5.x) for keys a config.json omits.
HF_DEFAULTS = dict(
    vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, expert_capacity=64, num_layers=12,
    num_sparse_encoder_layers=3, num_decoder_layers=None, num_sparse_decoder_layers=3,
    num_heads=12, num_experts=8, router_bias=False, router_jitter_noise=0.01,
    router_dtype="float32", router_ignore_padding_tokens=False,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, router_z_loss_coef=1e-3, router_aux_loss_coef=1e-3,
    dense_act_fn="relu", tie_word_embeddings=True, is_encoder_decoder=True)
_ACTIVATIONS = {"relu": "relu", "gated-gelu": "geglu"}
_INT_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
               "num_decoder_layers", "num_sparse_encoder_layers", "num_sparse_decoder_layers",
               "num_experts", "expert_capacity", "relative_attention_num_buckets",
               "relative_attention_max_distance")


def hf_sparse_layers(num_layers: int, num_sparse: int) -> tuple[int, ...]:
  """The blocks HF makes sparse, exactly as SwitchTransformersStack does."""
  step = num_layers // num_sparse if num_sparse > 0 else num_layers
  if step <= 0:
    return ()
  return tuple(i for i in range(num_layers) if i % step == 1 or step == 1)


def _layout(encoder: tuple, num_encoder: int, decoder: tuple, num_decoder: int):
  """(sparse_every, sparse_offset) giving these sparse blocks in both stacks, or None."""
  if not encoder and not decoder:
    return 0, 0
  for every in range(1, max(num_encoder, num_decoder) + 1):
    for offset in range(every):
      if (tuple(i for i in range(num_encoder) if i % every == offset) == encoder
          and tuple(i for i in range(num_decoder) if i % every == offset) == decoder):
        return every, offset
  return None


def config_from_hf(hf_config: dict) -> ModelConfig:
  """Our ModelConfig for a HF SwitchTransformers config.json dict.

  Raises:
    UserError: a setting we cannot represent, naming the HF field.
  """
  h = {**HF_DEFAULTS, **hf_config}
  # SwitchTransformersConfig.attribute_map: the generic names some configs use.
  for alias, name in (("hidden_size", "d_model"), ("num_attention_heads", "num_heads"),
                      ("num_hidden_layers", "num_layers")):
    if alias in hf_config and name not in hf_config:
      h[name] = hf_config[alias]
  model_type = hf_config.get("model_type", MODEL_TYPE)
  if model_type != MODEL_TYPE:
    raise UserError(f"HF config: model_type {model_type!r} is not {MODEL_TYPE!r}")
  if not h["is_encoder_decoder"]:
    raise UserError("HF config: is_encoder_decoder=false; only the encoder-decoder converts")
  if hf_config.get("router_type", "tokens_masked") != "tokens_masked":
    raise UserError(f"HF config: router_type {hf_config['router_type']!r} is not supported; "
                    "only top-1 token choice ('tokens_masked')")
  if h["router_bias"]:
    raise UserError("HF config: router_bias=true is not supported (our router has no bias, "
                    "as in the paper)")
  if h["router_dtype"] not in ("float32", "bfloat16"):
    raise UserError(f"HF config: router_dtype {h['router_dtype']!r} is not supported; use "
                    "'float32' (or 'bfloat16')")
  act = hf_config.get("dense_act_fn", hf_config.get("feed_forward_proj", h["dense_act_fn"]))
  if hf_config.get("is_gated_act"):  # T5 style: the gate's activation plus a flag
    act = "gated-gelu" if act in ("gelu_new", "gelu_pytorch_tanh", "gated-gelu") else f"gated {act}"
  if act not in _ACTIVATIONS:
    raise UserError(f"HF config: dense_act_fn {act!r} is not supported; use one of "
                    f"{sorted(_ACTIVATIONS)}")
  for name in _INT_FIELDS:
    if h[name] is not None and (not isinstance(h[name], int) or isinstance(h[name], bool)):
      raise UserError(f"HF config: {name} must be an integer, got {h[name]!r}")
  try:
    num_encoder = h["num_layers"]
    num_decoder = num_encoder if h["num_decoder_layers"] is None else h["num_decoder_layers"]
    encoder = hf_sparse_layers(num_encoder, h["num_sparse_encoder_layers"])
    decoder = hf_sparse_layers(num_decoder, h["num_sparse_decoder_layers"])
    if (encoder or decoder) and h["num_experts"] < 1:
      raise UserError(f"HF config: num_experts={h['num_experts']} but HF's layout rule makes "
                      f"encoder blocks {list(encoder)} and decoder blocks {list(decoder)} sparse")
    layout = _layout(encoder, num_encoder, decoder, num_decoder)
    if layout is None:
      raise UserError(
          f"HF config: num_sparse_encoder_layers / num_sparse_decoder_layers make blocks "
          f"{list(encoder)} of the encoder and {list(decoder)} of the decoder sparse; no one "
          "(sparse_every, sparse_offset) layout gives both")
    sparse_stacks = max(int(bool(encoder)) + int(bool(decoder)), 1)
    return ModelConfig(
        vocab_size=h["vocab_size"], d_model=h["d_model"], d_ff=h["d_ff"],
        num_heads=h["num_heads"], head_dim=h["d_kv"], num_encoder_layers=num_encoder,
        num_decoder_layers=num_decoder, ffn_activation=_ACTIVATIONS[act],
        tie_embeddings=bool(h["tie_word_embeddings"]),
        relative_attention_num_buckets=h["relative_attention_num_buckets"],
        relative_attention_max_distance=h["relative_attention_max_distance"],
        layer_norm_epsilon=float(h["layer_norm_epsilon"]), dropout_rate=float(h["dropout_rate"]),
        num_experts=h["num_experts"] if (encoder or decoder) else 0,
        sparse_every=layout[0], sparse_offset=layout[1], router="top1",
        expert_capacity=h["expert_capacity"], group_size=None,
        jitter_noise=float(h["router_jitter_noise"]),
        ignore_padding_tokens=bool(h["router_ignore_padding_tokens"]),
        router_dtype=h["router_dtype"],
        aux_loss_factor=float(h["router_aux_loss_coef"]) * sparse_stacks,
        router_z_loss_factor=float(h["router_z_loss_coef"]) * sparse_stacks)
  except ConfigError as e:
    raise UserError(f"HF config cannot be represented: {e}") from None
  except (TypeError, ValueError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"HF config: a field has the wrong type ({e})") from None


def _hf_sparse_count(num_layers: int, sparse: tuple[int, ...], field: str) -> int:
  for count in range(num_layers + 2):  # num_layers + 1 makes step 0: no sparse block
    if hf_sparse_layers(num_layers, count) == sparse:
      return count
  raise UserError(f"HF cannot express sparse blocks {list(sparse)} of {num_layers} "
                  f"({field}): its rule is `i % step == 1 or step == 1`")


def config_to_hf(config: ModelConfig, expert_capacity: Optional[int] = None) -> dict:
  """The HF config.json dict for `config`.

  Args:
    config: our config (top-1 routing, token-order priority).
    expert_capacity: HF's fixed per-sequence capacity; default the config's.

  Raises:
    UserError: a router HF lacks, or no per-sequence capacity to write.
  """
  routers = {config.router, config.decoder_router or config.router}
  if config.is_moe and routers != {"top1"}:
    raise UserError(f"HF SwitchTransformers routes top-1 only; this model uses {sorted(routers)}")
  if config.is_moe and config.batch_prioritized_routing:
    raise UserError("HF SwitchTransformers routes in token order; batch_prioritized_routing "
                    "cannot be exported")
  capacity = expert_capacity or config.expert_capacity
  if config.is_moe and capacity is None:
    raise UserError("HF needs a fixed expert capacity per sequence but this model uses "
                    "capacity factors; pass expert_capacity (--expert_capacity N)")
  encoder = config.sparse_layers(config.num_encoder_layers)
  decoder = config.sparse_layers(config.num_decoder_layers)
  sparse_stacks = max(int(bool(encoder)) + int(bool(decoder)), 1)
  return {
      "architectures": ["SwitchTransformersForConditionalGeneration"],
      "model_type": MODEL_TYPE, "is_encoder_decoder": True,
      "vocab_size": config.vocab_size, "d_model": config.d_model, "d_ff": config.d_ff,
      "d_kv": config.head_dim, "num_heads": config.num_heads,
      "num_layers": config.num_encoder_layers, "num_decoder_layers": config.num_decoder_layers,
      "num_sparse_encoder_layers": _hf_sparse_count(config.num_encoder_layers, encoder,
                                                    "encoder"),
      "num_sparse_decoder_layers": _hf_sparse_count(config.num_decoder_layers, decoder,
                                                    "decoder"),
      "num_experts": config.num_experts, "expert_capacity": int(capacity or 64),
      "router_bias": False, "router_jitter_noise": config.jitter_noise,
      "router_dtype": config.router_dtype,
      "router_ignore_padding_tokens": config.ignore_padding_tokens,
      "router_aux_loss_coef": config.aux_loss_factor / sparse_stacks,
      "router_z_loss_coef": config.router_z_loss_factor / sparse_stacks,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
      "dense_act_fn": {v: k for k, v in _ACTIVATIONS.items()}[config.ffn_activation],
      "tie_word_embeddings": config.tie_embeddings,
      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
  }


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor and where it lives in our tree.

  `in_dims` is how many leading axes of our array form HF's `in` axis (HF
  Linear weights are [out, in], ours [in..., out...]); 0 means same layout.
  `expert` is the index along our leading expert axis, or None.
  """
  hf_key: str
  path: tuple[str, ...]
  in_dims: int
  expert: Optional[int] = None


def _tensor_map(config: ModelConfig) -> list[_Tensor]:
  out = []

  def add(hf_key, path, in_dims, expert=None):
    out.append(_Tensor(hf_key, tuple(path.split("/")), in_dims, expert))

  add("shared.weight", "token_embedder/embedding", 0)
  ffn_names = ffn_input_names(config) + ("wo",)
  for stack, layers in (("encoder", config.num_encoder_layers),
                        ("decoder", config.num_decoder_layers)):
    decoder = stack == "decoder"
    attentions = [("layer.0.SelfAttention", "self_attention" if decoder else "attention")]
    norms = ["pre_self_attention_layer_norm" if decoder else "pre_attention_layer_norm"]
    if decoder:
      attentions.append(("layer.1.EncDecAttention", "encoder_decoder_attention"))
      norms.append("pre_cross_attention_layer_norm")
    norms.append("pre_mlp_layer_norm")
    if layers:  # HF's relative bias table is [buckets, H], ours [H, buckets]
      add(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
          f"{stack}/relpos_bias/rel_embedding", 1)
    for i in range(layers):
      hf, ours = f"{stack}.block.{i}", f"{stack}/layers_{i}"
      for hf_name, name in attentions:
        for hf_w, w in zip("qkvo", ("query", "key", "value", "out")):
          add(f"{hf}.{hf_name}.{hf_w}.weight", f"{ours}/{name}/{w}", 2 if w == "out" else 1)
      for j, norm in enumerate(norms):
        add(f"{hf}.layer.{j}.layer_norm.weight", f"{ours}/{norm}/scale", 0)
      mlp = f"{hf}.layer.{len(norms) - 1}.mlp"
      if config.is_sparse(i):
        add(f"{mlp}.router.classifier.weight", f"{ours}/mlp/router/kernel", 1)
        for e in range(config.num_experts):
          for w in ffn_names:
            add(f"{mlp}.experts.expert_{e}.{w}.weight", f"{ours}/mlp/experts/{w}", 1, e)
      else:
        for w in ffn_names:
          add(f"{mlp}.{w}.weight", f"{ours}/mlp/{w}", 1)
    add(f"{stack}.final_layer_norm.weight", f"{stack}/{stack}_norm/scale", 0)
  if not config.tie_embeddings:
    add("lm_head.weight", "decoder/logits_dense", 1)
  return out


def _copies_of_shared(config: ModelConfig) -> tuple[str, ...]:
  """HF keys that, when present, hold the token embedding again."""
  tied_head = ("lm_head.weight",) if config.tie_embeddings else ()
  return ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") + tied_head


def _hf_shape(ours: tuple[int, ...], in_dims: int) -> tuple[int, ...]:
  if in_dims == 0:
    return tuple(ours)
  return (math.prod(ours[in_dims:]), math.prod(ours[:in_dims]))


def _listing(names, limit=8) -> str:
  names = sorted(names)
  return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit
                                     else "")


def hf_to_params(state_dict: dict, config: ModelConfig) -> dict:
  """Our unboxed float32 parameter tree from a HF state dict of numpy arrays.

  Raises:
    UserError: missing, unexpected or misshapen tensors, by name; a copy
      of the embedding that differs from `shared.weight`.
  """
  tensors = _tensor_map(config)
  known = {t.hf_key for t in tensors}
  copies = [k for k in _copies_of_shared(config) if k in state_dict]
  missing = known - set(state_dict)
  unexpected = set(state_dict) - known - set(copies)
  if missing or unexpected:
    raise UserError("HF weights do not match config.json: "
                    + "; ".join(([f"missing {_listing(missing)}"] if missing else [])
                                + ([f"unexpected {_listing(unexpected)}"] if unexpected else [])))
  expected = traverse_util.flatten_dict(nn.unbox(abstract_params(config)))
  wrong, flat, experts = [], {}, {}
  for t in tensors:
    ours = expected[t.path].shape[1:] if t.expert is not None else expected[t.path].shape
    want = _hf_shape(ours, t.in_dims)
    x = np.asarray(state_dict[t.hf_key])
    if x.shape != want:
      wrong.append(f"{t.hf_key} has shape {x.shape}, expected {want}")
      continue
    x = x.astype(np.float32) if t.in_dims == 0 else x.T.astype(np.float32).reshape(ours)
    if t.expert is None:
      flat[t.path] = x
    else:
      experts.setdefault(t.path, {})[t.expert] = x
  if wrong:
    raise UserError(f"HF weights have wrong shapes: {_listing(wrong, 4)}")
  for path, by_index in experts.items():
    flat[path] = np.stack([by_index[e] for e in range(config.num_experts)])
  for key in copies:
    if not np.array_equal(np.asarray(state_dict[key], np.float32), flat[tensors[0].path]):
      raise UserError(f"HF weights: {key} differs from shared.weight; this model keeps one token "
                      "embedding for the encoder, the decoder and (tied) the output")
  return traverse_util.unflatten_dict(flat)


def params_to_hf(params: Any, config: ModelConfig) -> dict[str, np.ndarray]:
  """The HF state dict (float32 numpy) for our parameter tree.

  An untied model also gets `encoder/decoder.embed_tokens.weight`: HF 5.x
  unties those along with the head and would otherwise initialize them
  randomly.
  """
  flat = {p: np.asarray(v, np.float32)
          for p, v in traverse_util.flatten_dict(nn.unbox(params)).items()}
  check_shapes(config, {p: v.shape for p, v in flat.items()}, "the parameter tree")
  out = {}
  for t in _tensor_map(config):
    x = flat[t.path] if t.expert is None else flat[t.path][t.expert]
    if t.in_dims:
      x = x.reshape(_hf_shape(x.shape, t.in_dims)[::-1]).T
    out[t.hf_key] = np.ascontiguousarray(x)
  if not config.tie_embeddings:
    for key in _copies_of_shared(config):
      out[key] = out["shared.weight"].copy()
  return out


def load_hf_config(directory) -> dict:
  """The HF config.json dict of a model directory."""
  directory = storage.path(directory)
  if not storage.is_there(directory, "HF model directory", "dir"):
    raise UserError(f"HF model directory {directory} does not exist")
  file = directory / "config.json"
  if not file.is_file():
    raise UserError(f"{directory}: no config.json")
  return read_json_object(file)


def load_hf_dir(directory) -> tuple[ModelConfig, dict]:
  """(config, unboxed float32 params) of a HF SwitchTransformers directory."""
  config = config_from_hf(load_hf_config(directory))
  with storage.local_copy(directory) as local:  # safetensors and torch read local files
    return config, hf_to_params(read_weights(local), config)


def save_hf_dir(directory, config: ModelConfig, params: Any, *,
                expert_capacity: Optional[int] = None, overwrite: bool = False) -> epath.Path:
  """Writes config.json and model.safetensors atomically (nothing on error)."""
  hf_config = config_to_hf(config, expert_capacity)
  tensors = params_to_hf(params, config)
  with atomic_directory(directory, overwrite, marker="config.json") as tmp:
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
  return storage.path(directory)
