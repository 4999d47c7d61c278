"""What the planner knows about a model: dimensions from its config and exact parameter structure.

The structure (parameter counts, every ``nn.Linear`` inside the decoder layers with its shape)
comes from building the model on the meta device, so it is exact for any architecture that
transformers knows. The built-in catalog stores the same structure as data, so planning a catalog
model needs no torch import at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hf_ftkit.errors import BadInputError

# Config attribute names differ between architectures (GPT-2 says n_embd, most say hidden_size).
_ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "experts_per_token": ("num_experts_per_tok", "top_k", "moe_top_k"),
}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a config dict or a ``PretrainedConfig``, trying each architecture's alias."""
    for name in _ALIASES.get(key, (key,)):
        value = cfg.get(name) if isinstance(cfg, Mapping) else _attribute(cfg, name)
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return max(value)  # a size given per layer (Gemma 3n's intermediate_size): the largest layer's
        if value is not None:
            return value
    return default


def _attribute(cfg: Any, name: str) -> Any:
    """``cfg.name``; for an attribute a heterogeneous transformers config sets per layer (Gemma 4's head_dim),
    the largest of the layers' values, which the formulas then plan every layer with."""
    per_layer = getattr(cfg, "per_layer_attributes", None)
    if per_layer and name in per_layer:
        values = [getattr(layer, name, None) for layer in cfg.per_layer_config]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return max(numbers) if numbers else None
    return getattr(cfg, name, None)


@dataclass(frozen=True)
class LinearGroup:
    """All ``nn.Linear`` modules in the decoder that share a name suffix (``q_proj``) and shape."""

    name: str
    in_features: int
    out_features: int
    count: int
    has_bias: bool = False
    # transformers' bitsandbytes integration replaces exact nn.Linear and Conv1D modules only: a subclass
    # (Falcon's FalconLinear) stays in the load dtype under load_in_4bit
    quantizable: bool = True

    @property
    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.has_bias else 0))


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions and exact parameter structure of a causal LM.

    Attributes:
        model_id: hub id or path the spec was resolved from.
        model_type: the config's ``model_type`` (``llama``, ``qwen3_moe`` …).
        params_total: unique parameters (tied weights counted once).
        params_embedding: input embedding parameters.
        params_lm_head: output projection parameters, 0 when tied to the embedding.
        linears: every ``nn.Linear`` inside the decoder layers, grouped by name and shape;
            these are what LoRA ``all-linear`` targets and what 4-bit quantization replaces.
        params_largest_layer: parameters of the largest decoder layer (the unit FSDP gathers).
        config: the raw config dict it came from.
    """

    model_id: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int | None
    tie_embeddings: bool
    params_total: int
    params_embedding: int
    params_lm_head: int
    linears: tuple[LinearGroup, ...]
    params_largest_layer: int
    norms_per_layer: int = 2
    qk_norm: bool = False
    norm_scales_in_fp32: bool = False  # norms multiply their weight in fp32 (Gemma): full FT keeps the value in fp32
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    sliding_window: int | None = None
    sliding_layers: int = 0  # decoder layers whose attention is limited to the sliding window
    final_logit_softcapping: bool = False
    # the attention soft-caps its scores (Gemma 2): through a tanh, whose output its backward keeps
    attn_logit_softcapping: bool = False
    supports_sdpa: bool = True
    supports_flash_attn: bool = True
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def params_linear(self) -> int:
        return sum(g.params for g in self.linears)

    @property
    def params_quantizable(self) -> int:
        """Decoder linear parameters that a 4-bit load quantizes."""
        return sum(g.params for g in self.linears if g.quantizable)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def linear_names(self) -> list[str]:
        return sorted({g.name for g in self.linears})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("config")
        data["linears"] = [{k: v for k, v in g.items() if k != "quantizable" or not v} for g in data["linears"]]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> ModelSpec:
        values = dict(data)
        values["linears"] = tuple(LinearGroup(**g) for g in values["linears"])
        return cls(**values, config=dict(config or {}))


def dims_from_config(cfg: Any) -> dict[str, Any]:
    """The dimensions the activation model needs, from a ``PretrainedConfig`` (or a config dict)."""
    if _get(cfg, "hidden_size") is None:  # BLT and other models whose text config nests its sizes elsewhere
        raise BadInputError(f"model_type {_get(cfg, 'model_type', 'unknown')!r} gives no hidden_size in its "
                            "(text) config: hf-ftkit cannot read its decoder's sizes; plan a decoder LM instead.")
    hidden = int(_get(cfg, "hidden_size"))
    # A transformers config names its attention heads num_attention_heads (its attribute_map maps GPT-2's n_head):
    # there, num_heads is a state-space model's (Mamba-2, xLSTM), not attention
    heads = _get(cfg, "num_attention_heads") if isinstance(cfg, Mapping) else _attribute(cfg, "num_attention_heads")
    if heads is None:  # Mamba, RWKV ...: no attention to plan
        raise BadInputError(f"model_type {_get(cfg, 'model_type', 'unknown')!r} has no attention heads "
                            "(num_attention_heads): hf-ftkit plans attention decoders, not state-space or recurrent "
                            "models; plan an attention model instead.")
    heads = int(heads)
    kv_heads = int(_get(cfg, "num_key_value_heads") or heads)
    head_dim = int(_get(cfg, "head_dim") or hidden // heads)
    intermediate = int(_get(cfg, "intermediate_size") or 4 * hidden)
    experts = int(_get(cfg, "num_experts") or 0)
    return {
        "model_type": str(_get(cfg, "model_type", "unknown")),
        "num_layers": int(_get(cfg, "num_hidden_layers")),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(_get(cfg, "vocab_size")),
        "max_position": _get(cfg, "max_position_embeddings"),
        "num_experts": experts,
        "experts_per_token": int(_get(cfg, "experts_per_token") or 0) if experts else 0,
        "moe_intermediate_size": int(_get(cfg, "moe_intermediate_size") or (intermediate if experts else 0)),
        "shared_expert_intermediate_size": int(_get(cfg, "shared_expert_intermediate_size") or 0),
        "sliding_window": _get(cfg, "sliding_window"),
        "sliding_layers": _sliding_layers(cfg),
        "final_logit_softcapping": bool(_get(cfg, "final_logit_softcapping")),
        "attn_logit_softcapping": bool(_get(cfg, "attn_logit_softcapping")),
    }


def _sliding_layers(cfg: Any) -> int:
    """How many decoder layers attend through the sliding window: those ``layer_types`` names so (Gemma 2 and 3,
    Qwen2/3 with ``use_sliding_window``), else every layer when the config sets a window (Mistral, Mixtral, Phi-3
    and Qwen3-MoE pick the sliding mask for all their layers whenever ``sliding_window`` is set)."""
    if not _get(cfg, "sliding_window"):
        return 0
    types = _get(cfg, "layer_types")
    if types is not None:
        return sum(1 for t in types if t == "sliding_attention")
    return int(_get(cfg, "num_hidden_layers"))
