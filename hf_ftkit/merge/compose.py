"""Combining LoRA adapters into one: PEFT's ``add_weighted_adapter`` methods, plus an exact weighted sum.

PEFT's ``linear``/``ties``/``dare_*``/``magnitude_prune`` mix the A and B matrices separately, so for several
adapters their ``ΔW`` is not ``Σ wᵢ·ΔWᵢ`` (peft #3004); ``cat`` stacks the factors and is exact, and the ``_svd``
forms truncate the exact sum to a rank. The default ``exact`` method is ``cat`` with the result's scaling pinned
to 1, which also sidesteps PEFT copying the first adapter's rsLoRA/DoRA flags onto the result (peft #3761).
Every composition reports its per-layer relative Frobenius error against ``Σ wᵢ·ΔWᵢ``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_ftkit.errors import BadInputError
from hf_ftkit.merge.adapters import PREFIX, Adapter, LoraModule, read_adapter
from hf_ftkit.merge.inspect import SAME_RANK_METHODS, compatibility
from hf_ftkit.merge.methods import METHODS  # kept in a torch-free module: the CLI parser reads it

NEEDS_DENSITY = ("ties", "dare", "magnitude_prune")


@dataclass
class Composition:
    """A composed adapter (PEFT's saved form) and how far its ``ΔW`` is from the exact weighted sum."""

    method: str
    exact: bool
    sources: list[str]
    weights: list[float]
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    layer_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.layer_errors.values(), default=0.0)

    def as_adapter(self, path: Path | None = None) -> Adapter:
        adapter = Adapter(path or Path("<composed>"), self.config, Path("<memory>"), {})
        adapter._tensors = self.tensors
        adapter.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        return adapter

    def save(self, directory: Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into an existing directory."""
        from safetensors.torch import save_file

        (directory / "adapter_config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(directory / "adapter_model.safetensors"),
                  metadata={"format": "pt"})

    def report(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "exact": self.exact,
            "sources": self.sources,
            "weights": self.weights,
            "rank": self.config.get("r"),
            "max_relative_error": self.max_error,
            "layer_errors": self.layer_errors,
        }


def compose(
    base: str | Path | None,
    adapters: list[str | Path | Adapter],
    weights: list[float] | None = None,
    method: str = "exact",
    *,
    density: float | None = None,
    svd_rank: int | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
) -> Composition:
    """Combine LoRA adapters into one adapter.

    Args:
        base: the base model (directory, cached hub id or catalog id) whose config shapes the adapters;
            None takes the first adapter's ``base_model_name_or_path``. No base weights are loaded.
        adapters: adapter directories (or already-read ``Adapter`` objects).
        weights: one weight per adapter (default 1 each).
        method: ``exact`` (default, ``Σ wᵢ·ΔWᵢ``) or any ``add_weighted_adapter`` combination type.
        density: kept fraction for ``ties``/``dare_*``/``magnitude_prune`` methods.
        svd_rank: rank of the ``_svd`` methods' result (default: the largest input rank).
        seed: seeds the random pruning of the ``dare`` methods.

    Example:
        >>> composed = compose("HuggingFaceTB/SmolLM2-135M-Instruct", ["out/a", "out/b"], [0.7, 0.3])
        >>> composed.max_error  # 0 up to rounding for the exact method
    """
    if method not in METHODS:
        raise BadInputError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}.")
    read = [a if isinstance(a, Adapter) else read_adapter(a, allow_pickle=allow_pickle) for a in adapters]
    if not read:
        raise BadInputError("no adapter given; pass at least one adapter directory.")
    weights = [1.0] * len(read) if weights is None else [float(w) for w in weights]
    if len(weights) != len(read):
        raise BadInputError(f"{len(weights)} weights for {len(read)} adapters; pass one --weights value per adapter.")
    _check_method_inputs(read, method, density)
    sources = [str(a.path) for a in read]
    if len(read) == 1 and METHODS[method][1]:
        return _scaled_copy(read[0], weights[0], method, sources)
    return _compose_with_peft(base, read, weights, method, density, svd_rank, seed, sources)


def _check_method_inputs(adapters: list[Adapter], method: str, density: float | None) -> None:
    errors = [f for f in compatibility(adapters) if f.level == "error"]
    if errors:
        raise BadInputError(errors[0].message)
    if len(adapters) == 1 and adapters[0].use_dora and not METHODS[method][1]:
        raise BadInputError(f"a DoRA adapter cannot go through method {method!r}; merge it as is (--method exact).")
    ranks = {m.rank for a in adapters for m in a.modules().values()}
    if method in SAME_RANK_METHODS and len(adapters) > 1 and len(ranks) > 1:
        raise BadInputError(
            f"method {method!r} mixes A and B matrices index by index and needs equal ranks, but the adapters have "
            f"ranks {sorted(ranks)}; use --method exact (or cat) for the exact sum, or svd to truncate it."
        )
    if any(key in method for key in NEEDS_DENSITY):
        if density is None or not 0 < density <= 1:
            raise BadInputError(f"method {method!r} keeps a fraction of each update; pass --density in (0, 1].")
    if any(a.lora_bias for a in adapters) and not METHODS[method][1]:
        raise BadInputError(
            f"method {method!r} cannot combine lora_bias terms; use --method exact, which sums them exactly."
        )


def _scaled_copy(adapter: Adapter, weight: float, method: str, sources: list[str]) -> Composition:
    """One adapter: the exact answer is the adapter itself with ΔW (and any lora bias) times ``weight``."""
    if adapter.use_dora and weight != 1.0:
        raise BadInputError(
            "a DoRA adapter cannot be scaled: its magnitude vector renormalizes the weight, so w·ΔW is not "
            "expressible; merge it with weight 1."
        )
    tensors = {}
    for key, tensor in adapter.tensors().items():
        scaled = key.endswith(("lora_B.weight", "lora_B.bias", "lora_embedding_B")) and weight != 1.0
        tensors[key] = tensor * weight if scaled else tensor
    if adapter.full_tensors() and weight != 1.0:
        raise BadInputError(
            "the adapter carries full modules (modules_to_save or a resized embedding), which cannot be scaled; "
            "use weight 1."
        )
    return Composition(method, True, sources, [weight], dict(adapter.config), tensors,
                       dict.fromkeys(adapter.modules(), 0.0))


def _compose_with_peft(
    base: str | Path | None,
    adapters: list[Adapter],
    weights: list[float],
    method: str,
    density: float | None,
    svd_rank: int | None,
    seed: int,
    sources: list[str],
) -> Composition:
    from peft import LoraConfig, PeftModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from hf_ftkit.merge.base import config_for_adapter, skeleton_model

    config = config_for_adapter(base, adapters[0].base_model)
    vocab = _resized_vocab(adapters)
    if vocab:
        config = {**config, "vocab_size": vocab}
    model: Any = skeleton_model(config)
    names = [f"src{i}" for i in range(len(adapters))]
    for i, (name, adapter) in enumerate(zip(names, adapters, strict=True)):
        lora_config = LoraConfig(**_lora_fields(adapter.config, modules_to_save=None))
        if i == 0:
            model = PeftModel(model, lora_config, adapter_name=name)
        else:
            model.add_adapter(name, lora_config)
        lora_only = {k: v for k, v in adapter.tensors().items() if _is_lora_key(k)}
        set_peft_model_state_dict(model, lora_only, adapter_name=name)
    torch.manual_seed(seed)
    model.add_weighted_adapter(
        names, weights, "composed", combination_type=METHODS[method][0], density=density, svd_rank=svd_rank,
        svd_full_matrices=False,  # the truncated factors are the same; full U/V only cost time
    )
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="composed").items()}
    rank = int(model.peft_config["composed"].r)
    _add_bias_sum(tensors, adapters, weights)
    full = {}
    for adapter in adapters:
        full.update({PREFIX + k: v for k, v in adapter.full_tensors().items()})
    tensors.update(full)
    out_config = _composed_config(adapters, model.peft_config["composed"], rank, full)
    composition = Composition(method, METHODS[method][1], sources, weights, out_config, tensors)
    composition.layer_errors = layer_errors(composition.as_adapter().modules(), adapters, weights)
    return composition


def _lora_fields(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    from dataclasses import fields

    from peft import LoraConfig

    known = {f.name for f in fields(LoraConfig)}
    values = {k: v for k, v in config.items() if k in known and k not in ("peft_type", "task_type", "revision")}
    return {**values, **overrides, "inference_mode": True}


def _is_lora_key(key: str) -> bool:
    return ".lora_" in key


def _resized_vocab(adapters: list[Adapter]) -> int | None:
    rows = {
        int(t.shape[0]) for a in adapters for n, t in a.full_tensors().items() if n.endswith("embed_tokens.weight")
    }
    return rows.pop() if len(rows) == 1 else None


def _add_bias_sum(tensors: dict[str, torch.Tensor], adapters: list[Adapter], weights: list[float]) -> None:
    """PEFT's composition drops lora_B biases; with the result's scaling at 1 the exact bias is ``Σ wᵢ sᵢ bᵢ``."""
    sums: dict[str, torch.Tensor] = {}
    for adapter, weight in zip(adapters, weights, strict=True):
        for name, module in adapter.modules().items():
            if module.bias is not None:
                term = module.bias.float() * (weight * module.scaling)
                sums[name] = sums[name] + term if name in sums else term
    for name, bias in sums.items():
        tensors[f"{PREFIX}{name}.lora_B.bias"] = bias


def _composed_config(adapters: list[Adapter], peft_config: Any, rank: int, full: dict[str, Any]) -> dict[str, Any]:
    """The result's adapter_config: scaling exactly 1 (alpha = r, no rsLoRA), plain LoRA, union of targets."""
    config = dict(adapters[0].config)
    targets = peft_config.target_modules
    config.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        use_dora=False,
        lora_bias=any(a.lora_bias for a in adapters),
        rank_pattern={},
        alpha_pattern={},
        target_modules=sorted(targets) if isinstance(targets, set | list) else targets,
        modules_to_save=sorted({k.removeprefix(PREFIX).rsplit(".", 1)[0] for k in full}) or None,
        init_lora_weights=True,
        inference_mode=True,
    )
    return config


def layer_errors(composed: dict[str, LoraModule], adapters: list[Adapter], weights: list[float]) -> dict[str, float]:
    """Per module: ``‖ΔW_composed − Σ wᵢ ΔWᵢ‖_F / ‖Σ wᵢ ΔWᵢ‖_F``, from the low-rank factors (no full ΔW formed)."""
    errors = {}
    sources = [a.modules() for a in adapters]
    for name in sorted(set(composed).union(*sources)):
        target = [(w * left, right) for w, mods in zip(weights, sources, strict=True) if name in mods
                  for left, right in [mods[name].factors()]]
        mine = [composed[name].factors()] if name in composed else []
        diff = mine + [(-left, right) for left, right in target]
        reference = _frobenius(target)
        errors[name] = _frobenius(diff) / reference if reference > 0 else _frobenius(diff)
    return errors


def _frobenius(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """‖Σ Lᵢ Rᵢ‖_F via ``trace((LᵀL)(RRᵀ))`` on the stacked factors, in float64."""
    if not terms:
        return 0.0
    left = torch.cat([t[0].double() for t in terms], dim=1)
    right = torch.cat([t[1].double() for t in terms], dim=0)
    squared = float(((left.T @ left) * (right @ right.T)).sum())
    return math.sqrt(max(squared, 0.0))
