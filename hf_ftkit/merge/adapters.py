"""Reading PEFT LoRA adapter directories: config, tensors, per-module scaling, and what they change.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a pickled
``adapter_model.bin``, refused unless the caller allows pickle). Tensor names follow PEFT's saved form,
``base_model.model.<module>.lora_A.weight`` and so on; full tensors saved for ``modules_to_save`` or resized
embeddings replace the base's tensor of the same module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from hf_ftkit.errors import BadInputError
from hf_ftkit.merge._stream_io import read_header

PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)


@dataclass
class LoraModule:
    """The low-rank update of one module: ``ΔW = scaling · B @ A`` (transposed for embeddings / fan-in-fan-out)."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: Literal["linear", "embedding"]
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    bias: torch.Tensor | None = None  # lora_bias
    magnitude: torch.Tensor | None = None  # DoRA
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])  # (r, in_features) for linear and (r, vocab) for embedding LoRA

    def delta_shape(self) -> tuple[int, int]:
        shape = (int(self.lora_B.shape[0]), int(self.lora_A.shape[1]))
        return (shape[1], shape[0]) if self.kind == "embedding" or self.fan_in_fan_out else shape

    def delta(self) -> torch.Tensor:
        """``ΔW`` in float32, in the base weight's layout, computed the way PEFT's ``get_delta_weight`` does."""
        product = self.lora_B.float() @ self.lora_A.float()
        if self.kind == "embedding" or self.fan_in_fan_out:
            product = product.T
        return product.mul_(self.scaling)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` float32 with ``delta() == left @ right`` up to rounding (for norms without ΔW)."""
        left, right = self.lora_B.float() * self.scaling, self.lora_A.float()
        if self.kind == "embedding" or self.fan_in_fan_out:
            return right.T, left.T
        return left, right


@dataclass
class Adapter:
    """One adapter directory, read."""

    path: Path
    config: dict[str, Any]
    weights_file: Path
    shapes: dict[str, tuple[int, ...]]
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "?"))

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))  # validated by read_adapter

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def lora_bias(self) -> bool:
        return bool(self.config.get("lora_bias"))

    @property
    def scaling(self) -> float:
        return scaling_for(self.alpha, self.r, self.use_rslora)

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])

    @property
    def target_modules(self) -> list[str] | str:
        targets = self.config.get("target_modules") or []
        return targets if isinstance(targets, str) else sorted(targets)

    @property
    def size_on_disk(self) -> int:
        return self.weights_file.stat().st_size

    @property
    def trainable_params(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors of the adapter (it is small: loaded whole)."""
        if self._tensors is None:
            if self.weights_file.suffix == ".safetensors":
                from safetensors.torch import load_file

                try:
                    tensors = load_file(str(self.weights_file))
                except Exception as exc:  # safetensors raises its own error types for corrupt files
                    raise BadInputError(f"{self.weights_file} cannot be read ({exc}); re-save the adapter.") from None
            else:
                try:
                    tensors = torch.load(self.weights_file, map_location="cpu", weights_only=True)
                except Exception as exc:  # weights_only refuses anything but tensors: a crafted pickle lands here
                    raise BadInputError(f"{self.weights_file} is not a plain tensor file ({type(exc).__name__}); "
                                        "re-save the adapter as safetensors.") from None
                if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
                    raise BadInputError(f"{self.weights_file} does not hold a dict of tensors; re-save the adapter.")
            for name, tensor in tensors.items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise BadInputError(f"{self.weights_file}: tensor {name} holds NaN or infinite values; the "
                                        "adapter is broken (diverged training?): use an earlier checkpoint.")
            self._tensors = tensors
        return self._tensors

    def uncovered_modules(self) -> list[str]:
        """LoRA modules in the weights file that the config's ``target_modules`` does not match: PEFT would
        silently ignore them when it loads the adapter, while a tensor-by-tensor merge would apply them."""
        if self.config.get("target_parameters") or not self.config.get("target_modules"):
            return []
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists
        from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

        if str(self.config.get("target_modules")).lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            # PEFT expands "all-linear" to every linear layer but the output layer when it loads the adapter
            return sorted(name for name, module in self.modules().items()
                          if module.kind != "linear" or name.rsplit(".", 1)[-1] == "lm_head")
        fields = LoraConfig.__dataclass_fields__
        try:
            config = LoraConfig(**{k: v for k, v in self.config.items() if k in fields and k != "peft_type"})
        except (TypeError, ValueError):
            return []  # an unusual config PEFT itself cannot build; other checks name what is wrong
        return sorted(name for name in self.modules() if not check_target_module_exists(config, name))

    def modules(self) -> dict[str, LoraModule]:
        """The low-rank modules, by base module path."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors().items():
            match = _LORA_KEY.match(key.removeprefix(PREFIX))
            if match:
                parts.setdefault(match["module"], {})[match["part"].removesuffix(".weight")] = tensor
        modules = {}
        for name, found in parts.items():
            embedding = "lora_embedding_A" in found
            lora_a = found.get("lora_embedding_A" if embedding else "lora_A")
            lora_b = found.get("lora_embedding_B" if embedding else "lora_B")
            if lora_a is None or lora_b is None:
                raise BadInputError(f"{self.weights_file}: module {name} has only one of lora_A/lora_B; re-save it.")
            if lora_a.dim() != 2 or lora_b.dim() != 2 or _rank_of(lora_b, embedding) != int(lora_a.shape[0]):
                raise BadInputError(f"{self.weights_file}: module {name} has lora_A {tuple(lora_a.shape)} and lora_B "
                                    f"{tuple(lora_b.shape)}, whose ranks disagree; re-save the adapter.")
            modules[name] = LoraModule(
                name=name,
                kind="embedding" if embedding else "linear",
                lora_A=lora_a,
                lora_B=lora_b,
                scaling=self.module_scaling(name, int(lora_a.shape[0])),
                bias=found.get("lora_B.bias"),
                magnitude=found.get("lora_magnitude_vector"),
                fan_in_fan_out=bool(self.config.get("fan_in_fan_out")),
            )
        return modules

    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Whole tensors the adapter carries (``modules_to_save``, saved embedding layers), by base tensor name."""
        out = {}
        for key, tensor in self.tensors().items():
            name = key.removeprefix(PREFIX)
            if _LORA_KEY.match(name):
                continue
            name = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
            out[name] = tensor
        return out

    def module_scaling(self, module: str, rank: int) -> float:
        """``lora_alpha / r`` (or ``/ √r`` with rsLoRA), honouring ``alpha_pattern`` as PEFT does."""
        from peft.utils.other import get_pattern_key

        alpha = self.alpha
        patterns = self.config.get("alpha_pattern") or {}
        if patterns:
            key = get_pattern_key(list(patterns), module)
            alpha = float(patterns.get(key, alpha))
        return scaling_for(alpha, rank, self.use_rslora)


def _rank_of(lora_b: torch.Tensor, embedding: bool) -> int:
    # Linear: A (r, in), B (out, r). Embedding: A (r, vocab), B (dim, r) as PEFT stores them.
    return int(lora_b.shape[1])


def _check_config(config: dict[str, Any], config_file: Path) -> None:
    """The numbers the merge computes with: a positive integer rank and a finite alpha."""
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise BadInputError(f"{config_file}: r = {r!r} is not a positive integer rank; fix or re-save the adapter.")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise BadInputError(f"{config_file}: lora_alpha = {alpha!r} is not a finite number; fix or re-save the "
                            "adapter.")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str | list):
        raise BadInputError(f"{config_file}: target_modules = {targets!r} is neither a list nor a pattern; fix or "
                            "re-save the adapter.")


def scaling_for(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read an adapter directory's config and tensor header (tensors load lazily).

    Raises:
        BadInputError: not a directory, no ``adapter_config.json``, no weights, pickle weights without
            ``allow_pickle``, or a corrupt/truncated weights file.
    """
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not path.is_dir():
        raise BadInputError(f"adapter directory {path} does not exist; pass the folder save_pretrained wrote.")
    if not config_file.is_file():
        raise BadInputError(f"{path} has no adapter_config.json; pass a PEFT adapter folder (save_pretrained output).")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{config_file} is not valid JSON (line {exc.lineno}); fix or re-save it.") from None
    if not isinstance(config, dict):
        raise BadInputError(f"{config_file} holds a {type(config).__name__}, not an object of LoRA settings; "
                            "re-save the adapter.")
    _check_config(config, config_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise BadInputError(f"{path} is a {config.get('peft_type')} adapter; hf-ftkit composes and merges LoRA only.")
    safetensors_file, pickle_file = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if safetensors_file.is_file():
        entries, _ = read_header(safetensors_file)
        shapes = {e.name: e.shape for e in entries}
        return Adapter(path, config, safetensors_file, shapes)
    if pickle_file.is_file():
        if not allow_pickle:
            raise BadInputError(
                f"{path} holds pickle weights (adapter_model.bin), which can run code when loaded; "
                "re-save it as safetensors or pass --allow-pickle if you trust it."
            )
        adapter = Adapter(path, config, pickle_file, {})
        adapter.shapes = {k: tuple(v.shape) for k, v in adapter.tensors().items()}
        return adapter
    raise BadInputError(f"{path} has adapter_config.json but no adapter_model.safetensors; re-save the adapter.")
