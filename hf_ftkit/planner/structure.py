"""Build a model on the meta device and read its exact parameter structure (needs torch)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from hf_ftkit.errors import BadInputError, first_line
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
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    decode = getattr(PretrainedConfig, "_decode_special_floats", lambda values: values)
    values = decode(dict(config))  # {"__float__": "Infinity"}, as transformers writes non-JSON floats
    model_type = values.pop("model_type", None)
    if not model_type:
        raise BadInputError("the model config has no 'model_type'; pass the model's full config.json.")
    if model_type not in CONFIG_MAPPING:
        raise BadInputError(
            f"transformers does not know model_type {model_type!r}; upgrade transformers or pass a known model.")
    from huggingface_hub.errors import StrictDataclassError  # transformers 5 validates config fields with it

    try:
        return AutoConfig.for_model(model_type, **values)
    except (KeyError, ValueError, TypeError, StrictDataclassError) as exc:
        raise BadInputError(f"transformers rejects this {model_type!r} config ({first_line(exc)}); pass the model's "
                            "own, complete config.json.") from None


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
        except ImportError as exc:  # e.g. a vision tower that needs timm
            raise BadInputError(f"transformers needs a package this environment lacks to build "
                                f"{config.model_type!r} ({first_line(exc)}); install it and plan again.") from None
        except (RuntimeError, TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError,
                AssertionError) as exc:
            raise BadInputError(f"transformers cannot build {config.model_type!r} from this config "
                                f"({first_line(exc)}); pass the model's own, complete config.json.") from None


def decoder_layers(model: Any, num_layers: int) -> Any:
    """The model's stack of ``num_layers`` decoder layers (the largest ModuleList of that length), or None."""
    import torch.nn as nn

    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, module)
    return best[1] if best else None


def decoder_stack(model: Any, num_layers: int | None = None) -> Any:
    """The model's decoder layers (a ModuleList): as many as its config counts, or ``num_layers`` of them in a model
    cut by :func:`keep_layers`. Raises ValueError when no such stack is found."""
    layers = decoder_layers(model, int(_text_config(model).num_hidden_layers) if num_layers is None else num_layers)
    if layers is None:
        raise ValueError("no stack of decoder layers found")
    return layers


def _text_config(model: Any) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _per_layer_lists(config: Any, num_layers: int) -> dict[str, list[Any]]:
    """Config entries that give one value per decoder layer (``layer_types``, ``no_rope_layers`` ...); lists of
    layer indices (``moe_layers`` naming every layer) say nothing per layer and are left out."""
    found = {}
    per_layer = getattr(config, "per_layer_attributes", None) or set()  # a heterogeneous config's own per-layer
    for key in {*config.to_dict(), "layer_types"} - per_layer - {"per_layer_config"}:  # values: in the shapes
        value = getattr(config, key, None)
        if not isinstance(value, list) or len(value) != num_layers or key == "architectures":
            continue
        if all(isinstance(v, int) for v in value) and len(set(value)) == num_layers:
            continue
        found[key] = value
    return found


_POSITION = re.compile(r"idx|index|_id$|_num(ber)?$")  # a layer's own position (layer_idx, layer_id, block_id ...)


def _layer_signature(layer: Any, per_layer: tuple[tuple[str, str], ...]) -> tuple[Any, ...]:
    """What makes two decoder layers cost the same: their modules, parameter shapes and per-layer settings (the
    layer's own index aside)."""
    parts: list[Any] = [per_layer]
    for name, module in layer.named_modules():
        settings = tuple(sorted(
            (k, v) for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and not _POSITION.search(k)
            and isinstance(v, (int, float, str, bool, type(None)))
        ))
        params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters(recurse=False))
        parts.append((name, type(module).__name__, params, settings))
    return tuple(parts)


def layer_kinds(model: Any) -> list[list[int]]:
    """The decoder layers' indices grouped by kind, in order of first appearance: one group for a uniform stack;
    DeepSeek's dense first layers, Jamba's Mamba and attention layers, Gemma 3's sliding and global ones apart."""
    config = _text_config(model)
    layers = decoder_stack(model)
    lists = _per_layer_lists(config, len(layers))
    kinds: dict[tuple[Any, ...], list[int]] = {}
    for i, layer in enumerate(layers):
        per_layer = tuple((key, repr(values[i])) for key, values in sorted(lists.items()))
        kinds.setdefault(_layer_signature(layer, per_layer), []).append(i)
    return list(kinds.values())


def keep_layers(model: Any, keep: tuple[int, ...]) -> None:
    """Cut ``model``'s decoder stack down to the layers ``keep``, numbered first: their indices, and their entries in
    the config's per-layer lists and per-layer configs, move to the front, so that the model runs them as its
    first layers. The config still counts every layer, so what the model sizes by its depth (Gemma 4's per-layer
    input embeddings, the KV cache's layers) stays as the full model has it, in every cut alike."""
    import torch.nn as nn

    config = _text_config(model)
    layers = decoder_stack(model)
    num_layers = len(layers)
    order = [*keep, *(i for i in range(num_layers) if i not in keep)]  # new index -> old index
    lists = _per_layer_lists(config, num_layers)
    path = next(name for name, module in model.named_modules() if module is layers)
    parent, _, attribute = path.rpartition(".")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new, old in enumerate(keep):
        for module in kept[new].modules():
            if getattr(module, "layer_idx", None) == old:
                module.layer_idx = new  # type: ignore[assignment]
    moved_to = {old: new for new, old in enumerate(order)}
    for module in kept.modules():  # per-layer maps keyed by layer index (Zamba2's shared block: layer -> adapter)
        for name, value in list(vars(module).items()):
            if "layer" in name and isinstance(value, dict) and value and all(k in moved_to for k in value):
                setattr(module, name, {moved_to[k]: v for k, v in value.items()})
    setattr(model.get_submodule(parent), attribute, kept)
    if getattr(config, "is_heterogeneous", False):  # per-layer values (Gemma 4's head_dim), keyed by layer index
        overrides = config.to_dict().get("per_layer_config") or {}
        by_layer = {int(k): v for k, v in overrides.items() if str(k).isdigit()}
        config.per_layer_config = {new: by_layer[old] for new, old in enumerate(order) if old in by_layer}
    for key, values in lists.items():
        moved = [values[i] for i in order]
        try:
            setattr(config, key, moved)
        except AttributeError:  # a property (Jamba's layer_types, Bamba's under the name its attribute_map gives):
            name = getattr(config, "attribute_map", {}).get(key, key)  # shadow it on a subclass of the config's class
            base = type(config)
            config.__class__ = type(base.__name__, (base,), {name: None})
            setattr(config, key, moved)


def spec_from_model(model: Any, model_id: str) -> ModelSpec:
    """Read a ``ModelSpec`` off an instantiated (usually meta) causal LM."""
    import torch.nn as nn

    config = _text_config(model)
    dims = dims_from_config(config)
    layers = decoder_layers(model, dims["num_layers"])
    if dims["num_experts"] and layers is not None and not any("expert" in n for n, _ in layers.named_modules()):
        # an expert count that configures no layer (Nemotron-H's default n_routed_experts on a pattern without MoE
        # layers): a dense model
        dims.update(num_experts=0, experts_per_token=0, moe_intermediate_size=0, shared_expert_intermediate_size=0)
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    head_weight = output.weight if output is not None else None
    tied = head_weight is None or head_weight is embedding
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
        norm_scales_in_fp32=any(_scales_in_fp32(m) for m in norms if getattr(m, "weight", None) is not None
                                and m.weight.shape[-1] == hidden),
        supports_sdpa=bool(getattr(model, "_supports_sdpa", True)),
        supports_flash_attn=bool(getattr(model, "_supports_flash_attn", True)),
        config=config.to_dict(),
        **dims,
    )


def _scales_in_fp32(norm: Any) -> bool:
    """Whether a 16-bit norm with a trained weight keeps its normalized value in fp32 for the weight's gradient
    (Gemma multiplies the fp32 value by ``1 + weight``; Llama casts it to the input dtype first): run on the meta
    device in bf16, it saves two fp32 tensors of its input's size (the upcast input and the normalized value)."""
    import copy

    import torch

    probe = copy.deepcopy(norm).to(torch.bfloat16)
    for param in probe.parameters():
        param.requires_grad_(True)
    hidden = probe.weight.shape[-1]
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t._cdata] = t  # one entry per tensor, however often it is saved
        return t

    x = torch.empty((2, hidden), dtype=torch.bfloat16, device="meta", requires_grad=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            probe(x)
    except Exception:  # a norm that does not run alone on the meta device: planned as the common kind
        return False
    return sum(1 for t in saved.values() if t.dtype == torch.float32 and t.shape == x.shape) >= 2


def spec_from_config(config: Any, model_id: str) -> ModelSpec:
    """Exact ``ModelSpec`` for a config object or dict, by building the model on meta."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    return spec_from_model(build_meta_model(config), model_id)
