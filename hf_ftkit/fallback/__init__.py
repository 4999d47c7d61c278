"""Choosing a setup that fits a memory budget (the QLoRA fallback ladder)."""
