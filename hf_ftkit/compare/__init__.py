"""``hf-ftkit compare``: full FT, LoRA, DoRA and QLoRA side by side (memory, GPUs, time, cost, size, risk)."""

from hf_ftkit.compare.flops import FlopsPerToken, flops_per_token
from hf_ftkit.compare.methods import Comparison, MethodRow, Placement, compare_methods

__all__ = ["Comparison", "FlopsPerToken", "MethodRow", "Placement", "compare_methods", "flops_per_token"]
