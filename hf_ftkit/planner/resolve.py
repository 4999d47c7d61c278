"""Find a model's config offline first: local path, HF cache, built-in catalog; the hub only if allowed."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from hf_ftkit._data import load
from hf_ftkit.errors import BadInputError, ModelNotFoundError
from hf_ftkit.planner.spec import ModelSpec


@cache
def _catalog_index() -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] = {}
    for entry in load("catalog")["models"]:
        for name in (entry["id"], *entry.get("aliases", ())):
            index[name.lower()] = entry
    return index


def catalog_ids() -> list[str]:
    """Hub ids of every catalog model."""
    return [entry["id"] for entry in load("catalog")["models"]]


def catalog_entry(model_id: str) -> dict[str, Any] | None:
    return _catalog_index().get(model_id.lower())


def _catalog_spec(entry: dict[str, Any], model_id: str) -> ModelSpec:
    spec = ModelSpec.from_dict(entry["spec"], entry["config"])
    return spec if model_id == spec.model_id else ModelSpec.from_dict({**entry["spec"], "model_id": model_id},
                                                                     entry["config"])


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BadInputError(f"{path} is a binary file, not a JSON config.json; pass the model's config.json.") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path} is not a readable config.json ({exc}); pass a valid file.") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path} does not hold a JSON object; pass a model's config.json.")
    return data


def _local_config(model: str) -> Path | None:
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / "config.json"
        if candidate.is_file():
            return candidate
        raise ModelNotFoundError(
            f"directory {path} has no config.json; pass a checkpoint directory or its config.json."
        )
    return None


def _cached_config(model: str) -> Path | None:
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    # The cache keeps a repository under "models--{org}--{name}" (huggingface_hub's documented layout). Look
    # for that folder before importing the download module, which costs more than a whole catalog plan.
    cache = constants.HF_HUB_CACHE
    if not (Path(cache) / ("models--" + model.replace("/", "--"))).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json", cache_dir=cache)
    return Path(found) if isinstance(found, str) else None


def _matches_catalog(config: dict[str, Any], entry: dict[str, Any]) -> bool:
    return all(config.get(k) == v for k, v in entry["config"].items() if k not in ("rope_scaling",))


def _spec_from_config_dict(config: dict[str, Any], model_id: str) -> ModelSpec:
    entry = catalog_entry(model_id)
    if entry is not None and _matches_catalog(config, entry):
        return _catalog_spec(entry, model_id)
    from hf_ftkit.planner.structure import spec_from_config

    return spec_from_config(config, model_id)


def resolve_model(model: str, *, allow_online: bool = False) -> ModelSpec:
    """The exact ``ModelSpec`` for a hub id, a checkpoint directory or a config.json path.

    Raises:
        ModelNotFoundError: no config was found in any place looked in.
    """
    if not model or not str(model).strip():
        raise BadInputError("MODEL is empty; pass a hub id, a checkpoint directory or a config.json path.")
    local = _local_config(model)
    if local is not None:
        return _spec_from_config_dict(_read_config(local), model)
    cached = _cached_config(model)
    if cached is not None:
        return _spec_from_config_dict(_read_config(cached), model)
    entry = catalog_entry(model)
    if entry is not None:
        return _catalog_spec(entry, model)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if allow_online and not offline:
        return _spec_from_config_dict(_download_config(model), model)
    raise ModelNotFoundError(
        f"no config for {model!r}: it is not a local path, not in the Hugging Face cache and not in "
        "hf-ftkit's catalog (`hf-ftkit plan --list-models`); pass a checkpoint directory or a config.json "
        "path, or add --online to fetch config.json from the hub."
    )


def _download_config(model: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        return _read_config(Path(hf_hub_download(model, "config.json")))
    except Exception as exc:  # hub errors are many; all mean the same to the user
        raise ModelNotFoundError(
            f"could not fetch config.json for {model!r} from the hub ({type(exc).__name__}); check the id and "
            "your access, or pass a local config.json."
        ) from exc
