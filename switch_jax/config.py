"""Model configuration: one flat, frozen dataclass and the named configs.

A flat config lets a reader follow one object from a gin binding to the
kernel (`ModelConfig.num_experts = 8` is one binding). `NAMED_CONFIGS` holds
every row of SPEC section 2 (paper and released) plus tiny configs for tests
and CPU runs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from switch_jax.errors import ConfigError

ROUTERS = ("top1", "top2", "expert_choice", "dropless")
CAPACITY_ROUTERS = ("top1", "top2", "expert_choice")
# The one vocabulary of the Switch layer's expert kernels: the value of
# `ModelConfig.dispatch` -> the routers it serves. model/moe/dispatch.py
# implements every kernel under the same name; switch_layer.py picks 'auto'
# and refuses a kernel its router or mesh cannot run.
DISPATCHES = {
    "auto": ROUTERS,  # the backend's fastest (switch_layer.auto_dispatch)
    "reference": ROUTERS,  # the plain loop the tests hold the others to; one device
    "gather": CAPACITY_ROUTERS,
    "looped": CAPACITY_ROUTERS,
    "compact": ("top1", "top2"),  # the filled slots only; experts on one device
    "ragged": ("dropless",),
    "bucketed": ("dropless",),
}
FFN_ACTIVATIONS = ("relu", "geglu")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A T5 encoder-decoder with optional Switch (mixture-of-experts) FFNs.

  `num_experts == 0` is the dense baseline. A layer `i` of a stack is sparse
  when `num_experts > 0`, `sparse_every > 0` and
  `i % sparse_every == sparse_offset` (the paper's layout, layers 1, 3, 5...,
  is `sparse_every=2, sparse_offset=1`; Switch-C, every FFN, is `1, 0`).
  """

  # Transformer shape.
  vocab_size: int = 32128
  d_model: int = 768
  d_ff: int = 2048
  num_heads: int = 12
  head_dim: int = 64
  num_encoder_layers: int = 12
  num_decoder_layers: int = 12
  ffn_activation: str = "geglu"
  tie_embeddings: bool = True
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  init_scale: float = 0.1
  dtype: str = "float32"  # activation dtype; parameters are always float32

  # Switch layers.
  num_experts: int = 0
  sparse_every: int = 2
  sparse_offset: int = 1
  router: str = "top1"
  decoder_router: Optional[str] = None  # None: same as `router`
  # Slots per expert per group: round(cf * S / E), the same for top-1 and
  # top-2 (routing.expert_capacity), so top-2 holds every choice at cf 2.0.
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0  # token-choice routers (top1, top2)
  # Expert choice at eval: None keeps the train factor, since each expert
  # fills all its C slots and a larger C gives every token more experts (at
  # cf 2.0 about two where training gave one): another function, not fewer drops.
  expert_choice_eval_capacity_factor: Optional[float] = None
  expert_capacity: Optional[int] = None  # per group; overrides the factors
  min_expert_capacity: int = 4
  group_size: Optional[int] = 8192  # tokens per routing group; None = one sequence
  jitter_noise: float = 0.0
  batch_prioritized_routing: bool = False
  ignore_padding_tokens: bool = True
  router_dtype: str = "float32"  # bfloat16 only for the paper's ablation
  expert_dropout_rate: Optional[float] = None  # None: same as dropout_rate
  aux_loss_factor: float = 1e-2
  router_z_loss_factor: float = 0.0
  # The expert kernel, a key of DISPATCHES: 'auto' is the backend's fastest
  # (docs/performance.md); 'reference' is the plain loop the tests hold the others to.
  dispatch: str = "auto"

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the field and the fix."""
    def need(cond, msg):
      if not cond:
        raise ConfigError(f"ModelConfig: {msg}")
    for name in ("vocab_size", "d_model", "d_ff", "num_heads", "head_dim"):
      need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
    need(self.num_encoder_layers >= 0 and self.num_decoder_layers > 0,
         "need num_encoder_layers >= 0 and num_decoder_layers >= 1")
    need(self.ffn_activation in FFN_ACTIVATIONS,
         f"ffn_activation must be one of {FFN_ACTIVATIONS}, got {self.ffn_activation!r}")
    need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    need(self.router_dtype in DTYPES,
         f"router_dtype must be one of {DTYPES}, got {self.router_dtype!r}")
    need(self.router in ROUTERS, f"router must be one of {ROUTERS}, got {self.router!r}")
    need(self.decoder_router is None or self.decoder_router in ROUTERS,
         f"decoder_router must be None or one of {ROUTERS}, got {self.decoder_router!r}")
    need(self.dispatch in DISPATCHES,
         f"dispatch must be one of {tuple(DISPATCHES)}, got {self.dispatch!r}")
    need(self.num_experts >= 0, f"num_experts must be >= 0, got {self.num_experts}")
    need(self.sparse_every >= 0, "sparse_every must be >= 0 (0 = no sparse layer)")
    need(self.sparse_every == 0 or 0 <= self.sparse_offset < self.sparse_every,
         f"sparse_offset must be in [0, sparse_every), got {self.sparse_offset}")
    need("top2" not in (self.router, self.decoder_router) or self.num_experts != 1,
         "router='top2' needs num_experts >= 2")
    need(self.train_capacity_factor > 0 and self.eval_capacity_factor > 0,
         "capacity factors must be positive")
    need(self.expert_choice_eval_capacity_factor is None
         or self.expert_choice_eval_capacity_factor > 0,
         "expert_choice_eval_capacity_factor must be positive or None (None: the train factor)")
    need(self.expert_capacity is None or self.expert_capacity > 0,
         "expert_capacity must be positive or None")
    need(self.group_size is None or self.group_size > 0, "group_size must be positive or None")
    need(0.0 <= self.dropout_rate < 1.0, "dropout_rate must be in [0, 1)")
    need(self.expert_dropout_rate is None or 0.0 <= self.expert_dropout_rate < 1.0,
         "expert_dropout_rate must be in [0, 1) or None")
    need(0.0 <= self.jitter_noise < 1.0, "jitter_noise must be in [0, 1)")
    if (self.stack_router(decoder=True) == "expert_choice"
        and self.sparse_layers(self.num_decoder_layers)):
      raise ConfigError(
          "ModelConfig: expert-choice routing is not causal (each expert picks its "
          "tokens from the whole sequence), so it cannot route a decoder layer. "
          "Keep router='expert_choice' for the encoder and set decoder_router to "
          "'top1', 'top2' or 'dropless'.")

  # Derived quantities.
  def is_sparse(self, layer: int) -> bool:
    return (self.num_experts > 0 and self.sparse_every > 0
            and layer % self.sparse_every == self.sparse_offset)

  def stack_router(self, decoder: bool) -> str:
    return (self.decoder_router or self.router) if decoder else self.router

  def sparse_layers(self, num_layers: int) -> tuple[int, ...]:
    return tuple(i for i in range(num_layers) if self.is_sparse(i))

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0 and (
        bool(self.sparse_layers(self.num_encoder_layers))
        or bool(self.sparse_layers(self.num_decoder_layers)))

  @property
  def expert_dropout(self) -> float:
    return self.dropout_rate if self.expert_dropout_rate is None else self.expert_dropout_rate

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"ModelConfig: unknown fields {unknown} (known: {sorted(known)})")
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))


def _t5(d_model, d_ff, heads, layers, **kw):
  return dict(d_model=d_model, d_ff=d_ff, num_heads=heads, head_dim=64,
              num_encoder_layers=layers, num_decoder_layers=layers, **kw)


_BASE = _t5(768, 2048, 12, 12)
_LARGE = _t5(1024, 2816, 16, 24)
_XXL = _t5(4096, 10240, 64, 24)
# Released checkpoints use ReLU experts and wider FFNs than the paper rows.
_REL_BASE = _t5(768, 3072, 12, 12, ffn_activation="relu", group_size=8192)

_NAMED = {
    # Paper (Table 9) rows.
    "t5_base": _BASE,
    "t5_large": _LARGE,
    "t5_xxl": dict(_XXL, tie_embeddings=False),
    "switch_base": dict(_BASE, num_experts=128),
    "switch_large": dict(_LARGE, num_experts=128),
    "switch_xxl": dict(_XXL, num_experts=64, tie_embeddings=False, min_expert_capacity=2),
    "switch_c": dict(_t5(2080, 6144, 32, 15, ffn_activation="relu"), num_experts=2048,
                     sparse_every=1, sparse_offset=0, tie_embeddings=False,
                     min_expert_capacity=2),
    # Released checkpoints (Hugging Face google/switch-*, t5x switch_classic).
    **{f"switch_base_{e}": dict(_REL_BASE, num_experts=e) for e in (8, 16, 32, 64, 128, 256)},
    "switch_large_128": dict(_t5(1024, 4096, 16, 24, ffn_activation="relu"),
                             num_experts=128, group_size=4096),
    "switch_xxl_128": dict(_XXL, num_experts=128, tie_embeddings=False,
                           eval_capacity_factor=4.0, min_expert_capacity=2),
    "switch_c_2048": dict(_t5(2080, 6144, 30, 15, ffn_activation="relu"), num_experts=2048,
                          sparse_every=1, sparse_offset=0, tie_embeddings=False,
                          train_capacity_factor=1.0, eval_capacity_factor=2.0,
                          group_size=2048, min_expert_capacity=2),
    # Tiny configs for tests and CPU runs (not in the paper).
    "tiny_dense": dict(vocab_size=128, d_model=32, d_ff=64, num_heads=2, head_dim=16,
                       num_encoder_layers=2, num_decoder_layers=2, group_size=None,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16),
}
_NAMED["tiny_switch"] = dict(_NAMED["tiny_dense"], num_experts=4)
_NAMED["tiny_switch_relu"] = dict(_NAMED["tiny_switch"], ffn_activation="relu")

NAMED_CONFIGS = {name: ModelConfig(**kw) for name, kw in _NAMED.items()}

# Parameter counts the paper (Table 9, Section 4) and the released checkpoints
# state, in parameters; tests hold `count_params` to these.
PUBLISHED_SIZES = {
    "t5_base": 223e6,
    "t5_large": 739e6,
    "t5_xxl": 11e9,
    "switch_base": 7e9,
    "switch_large": 26e9,
    "switch_c": 1571e9,
    "switch_base_8": 619e6,
    "switch_base_128": 7.4e9,
    "switch_large_128": 26e9,
    "switch_xxl_128": 395e9,
    "switch_c_2048": 1.6e12,
}


def get_config(name: str, **overrides) -> ModelConfig:
  """Returns the named config with `overrides` applied."""
  if name not in NAMED_CONFIGS:
    raise ConfigError(f"unknown model config {name!r}; known: {sorted(NAMED_CONFIGS)}")
  return NAMED_CONFIGS[name].replace(**overrides)
