"""Dtype names as the planner writes them (``bf16``) and as torch spells them, in one place."""

from __future__ import annotations

from typing import Any

_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "uint8": "uint8"}


def to_torch(name: str) -> Any:
    """``"bf16"`` → ``torch.bfloat16`` (imports torch)."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def from_torch(dtype: Any) -> str | None:
    """``torch.bfloat16`` (or its string form) → ``"bf16"``; None for anything else."""
    text = str(dtype).removeprefix("torch.")
    return next((short for short, long in _TORCH_NAMES.items() if long == text), None)
