"""The composition methods ``merge`` offers, from ``data/merge_methods.json`` (torch-free, for the CLI parser)."""

from __future__ import annotations

from hf_ftkit._data import load

# Our method name -> (PEFT combination_type, exact?).
METHODS: dict[str, tuple[str, bool]] = {
    name: (entry["peft"], bool(entry["exact"])) for name, entry in load("merge_methods")["methods"].items()
}
