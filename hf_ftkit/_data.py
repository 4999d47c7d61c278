"""Package data tables (JSON under ``hf_ftkit/data``), each loaded once."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def load(name: str) -> dict[str, Any]:
    """The parsed ``hf_ftkit/data/<name>.json``."""
    text = resources.files("hf_ftkit").joinpath("data", f"{name}.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data
