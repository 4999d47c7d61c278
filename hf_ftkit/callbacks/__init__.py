"""Trainer callbacks: thin layers over the library (planner, fallback)."""
