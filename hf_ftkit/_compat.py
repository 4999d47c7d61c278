"""Small shims over API differences between the library versions hf-ftkit supports."""

from __future__ import annotations

from typing import Any


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing, under transformers v5's name where it exists."""
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
