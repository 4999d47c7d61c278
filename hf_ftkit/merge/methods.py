"""The composition methods ``merge`` offers, as data (importable without torch, for the CLI's parser)."""

from __future__ import annotations

# Our method name -> (PEFT combination_type, exact?). Data, not branches.
METHODS: dict[str, tuple[str, bool]] = {
    "exact": ("cat", True),
    "cat": ("cat", True),
    "linear": ("linear", False),
    "svd": ("svd", False),
    "ties": ("ties", False),
    "ties_svd": ("ties_svd", False),
    "dare_linear": ("dare_linear", False),
    "dare_linear_svd": ("dare_linear_svd", False),
    "dare_ties": ("dare_ties", False),
    "dare_ties_svd": ("dare_ties_svd", False),
    "magnitude_prune": ("magnitude_prune", False),
    "magnitude_prune_svd": ("magnitude_prune_svd", False),
}
