"""Small file helpers shared across the package."""

from __future__ import annotations

from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
