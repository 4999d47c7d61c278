"""``AdapterSet``: one base in memory, several LoRA adapters loaded, switched per call or per request."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from hf_ftkit.errors import BadInputError
from hf_ftkit.merge.adapters import read_adapter
from hf_ftkit.merge.inspect import shapes_agree

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class AdapterSet:
    """Serve several adapters from one frozen base; memory grows by the adapters' size only.

    Args:
        base: a loaded ``transformers`` model, or a directory / cached hub id to load.
        adapters: ``{name: adapter_directory}``.
        dtype: dtype to load ``base`` in when it is a path (default: the checkpoint's).

    Example:
        >>> adapters = AdapterSet("./SmolLM2-135M-Instruct", {"support": "./a", "legal": "./b"})
        >>> with adapters.use("legal") as model:
        ...     model.generate(**inputs)
        >>> adapters.generate(input_ids, adapter_names=["support", "legal", "__base__"])  # one mixed batch
    """

    def __init__(self, base: Any, adapters: dict[str, str | Path], *, dtype: torch.dtype | None = None,
                 allow_pickle: bool = False) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if not adapters:
            raise BadInputError("AdapterSet needs at least one adapter: pass {name: directory}.")
        bad = [n for n in adapters if not n or n == BASE or "." in n]
        if bad:
            raise BadInputError(f"adapter name {bad[0]!r} is not allowed; use a plain name without dots.")
        read = {name: read_adapter(path, allow_pickle=allow_pickle) for name, path in adapters.items()}
        errors = shapes_agree(list(read.values()))  # each adapter keeps its own modules; only shapes must agree
        if errors:
            raise BadInputError(errors[0].message)
        if isinstance(base, str | Path):
            base = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto", trust_remote_code=False)
        names = list(adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()
        self._active = names[0]

    @property
    def names(self) -> list[str]:
        return list(self.model.peft_config)

    @property
    def adapter_bytes(self) -> int:
        """Bytes the adapters add to the base (LoRA factors and any saved module copies)."""
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                   if any(name in n.split(".") for name in self.names))

    def _check(self, name: str) -> None:
        if name not in self.model.peft_config:
            raise BadInputError(f"no adapter named {name!r}; loaded: {', '.join(self.names)}.")

    @contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """Make ``name`` the active adapter inside the block (``__base__`` for the bare base)."""
        if name == BASE:
            with self.model.disable_adapter():
                yield self.model
            return
        self._check(name)
        previous = self._active
        self.model.set_adapter(name)
        self._active = name
        try:
            yield self.model
        finally:
            self.model.set_adapter(previous)
            self._active = previous

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        """One forward pass of a batch whose rows each use their own adapter (PEFT's mixed-batch inference)."""
        self._check_batch(input_ids, adapter_names)
        return self.model(input_ids=input_ids, adapter_names=adapter_names, **kwargs).logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        """``generate`` with one adapter per row of the batch."""
        self._check_batch(input_ids, adapter_names)
        return self.model.generate(input_ids=input_ids, adapter_names=adapter_names, **kwargs)

    def _check_batch(self, input_ids: torch.Tensor, adapter_names: list[str]) -> None:
        if len(adapter_names) != input_ids.shape[0]:
            raise BadInputError(
                f"{len(adapter_names)} adapter names for a batch of {input_ids.shape[0]}; pass one name per row."
            )
        for name in adapter_names:
            if name != BASE:
                self._check(name)
