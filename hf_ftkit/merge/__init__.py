"""Adapter inspection, composition, merging (in memory or streaming) and hot-swap serving."""
