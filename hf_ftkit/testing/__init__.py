"""Helpers for tests and examples that need a real pretrained model without a hub."""

from hf_ftkit.testing.smollm2 import smollm2_path, smollm2_tokenizer_path

__all__ = ["smollm2_path", "smollm2_tokenizer_path"]
