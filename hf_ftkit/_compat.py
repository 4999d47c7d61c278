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


def checkpointing_args(enabled: bool) -> dict[str, Any]:
    """``TrainingArguments`` keys for non-reentrant checkpointing, under transformers v5's names where they exist."""
    from dataclasses import fields

    from transformers import TrainingArguments

    prefix = "activation" if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)} else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None}
