"""Build a model on the meta device and read its exact parameter structure (needs torch)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.spec import LinearGroup, ModelSpec, dims_from_config

# Sizes a config.json may give; each must be a positive integer, and a config needs some of them.
DIMENSION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings", "n_embd", "n_layer",
                  "n_head", "n_inner", "n_positions", "d_model", "ffn_dim", "num_layers", "num_heads",
                  "moe_intermediate_size", "num_experts", "num_local_experts", "num_experts_per_tok", "n_embed")
REQUIRED_ANY = ("hidden_size", "n_embd", "n_embed", "d_model", "dim")


def check_dimensions(config: dict[str, Any]) -> None:
    """One sentence for sizes that cannot be a model's: negative, zero, fractional or not numbers, or none."""
    parts = [config, *(v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict))]
    for part in parts:
        for key in DIMENSION_KEYS:
            value = part.get(key)
            if value is None:
                continue
            values = value if isinstance(value, list) and value else [value]  # per-layer sizes (Gemma 3n)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise BadInputError(f"config.json gives {key} = {value!r}, which is not a positive integer; fix the "
                                    "config or pass the model's own config.json.")
    if not any(key in part for part in parts for key in REQUIRED_ANY):
        raise BadInputError("config.json gives no model size (hidden_size, layers, heads...); planning it from "
                            "transformers' defaults would describe another model: pass the model's full config.json.")


def config_from_dict(config: dict[str, Any]) -> Any:
    """A ``PretrainedConfig`` from a config.json dict (``model_type`` picks the class)."""
    from transformers import AutoConfig

    check_dimensions(config)
    values = dict(config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise BadInputError("the model config has no 'model_type'; pass the model's full config.json.")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (KeyError, ValueError) as exc:
        raise BadInputError(
            f"transformers does not know model_type {model_type!r}; upgrade transformers or pass a known model."
        ) from exc


def build_meta_model(config: Any) -> Any:
    """Instantiate the causal-LM class for ``config`` on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, trust_remote_code=False)
        except ValueError as exc:
            raise BadInputError(
                f"model_type {config.model_type!r} has no causal-LM class in transformers; "
                "hf-ftkit plans causal language models only."
            ) from exc
        except (RuntimeError, TypeError, AttributeError, ZeroDivisionError, AssertionError) as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise BadInputError(f"transformers cannot build {config.model_type!r} from this config ({reason}); "
                                "pass the model's own, complete config.json.") from None


def _decoder_layers(model: Any, num_layers: int) -> Any:
    import torch.nn as nn

    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, module)
    return best[1] if best else None


def spec_from_model(model: Any, model_id: str) -> ModelSpec:
    """Read a ``ModelSpec`` off an instantiated (usually meta) causal LM."""
    import torch.nn as nn

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    dims = dims_from_config(config)
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    head_weight = output.weight if output is not None else None
    tied = head_weight is None or head_weight is embedding
    layers = _decoder_layers(model, dims["num_layers"])
    layer_ids = {id(m) for m in layers.modules()} if layers is not None else set()

    from transformers.pytorch_utils import Conv1D

    groups: Counter[tuple[str, int, int, bool, bool]] = Counter()
    for name, module in model.named_modules():
        if id(module) not in layer_ids:
            continue
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out); PEFT treats it as linear
            shape = (module.weight.shape[0], module.weight.shape[1])
        else:
            continue
        quantizable = type(module) is nn.Linear or isinstance(module, Conv1D)  # as transformers' bnb integration
        groups[(name.rsplit(".", 1)[-1], *shape, module.bias is not None, quantizable)] += 1
    linears = tuple(
        LinearGroup(name=n, in_features=i, out_features=o, count=c, has_bias=b, quantizable=q)
        for (n, i, o, b, q), c in sorted(groups.items())
    )
    first = layers[0] if layers is not None else None
    hidden = dims["hidden_size"]
    norms = [m for m in first.modules() if "norm" in type(m).__name__.lower()] if first is not None else []
    return ModelSpec(
        model_id=model_id,
        params_total=sum(p.numel() for p in model.parameters()),
        params_embedding=embedding.numel(),
        params_lm_head=0 if tied or head_weight is None else head_weight.numel(),
        tie_embeddings=tied,
        linears=linears,
        params_largest_layer=max((sum(p.numel() for p in m.parameters()) for m in layers), default=0)
        if layers is not None
        else 0,
        norms_per_layer=sum(1 for m in norms if getattr(m, "weight", None) is not None and m.weight.shape[-1] == hidden)
        or 2,
        qk_norm=any(getattr(m, "weight", None) is not None and m.weight.shape[-1] != hidden for m in norms),
        supports_sdpa=bool(getattr(model, "_supports_sdpa", True)),
        supports_flash_attn=bool(getattr(model, "_supports_flash_attn", True)),
        config=config.to_dict(),
        **dims,
    )


def spec_from_config(config: Any, model_id: str) -> ModelSpec:
    """Exact ``ModelSpec`` for a config object or dict, by building the model on meta."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    return spec_from_model(build_meta_model(config), model_id)
