"""The base model of a merge: where its files are, its config, and a weightless skeleton for PEFT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_ftkit.errors import BadInputError, ModelNotFoundError


def resolve_base_dir(base: str | Path) -> Path:
    """A local checkpoint directory for ``base``: a path, or a hub id already in the Hugging Face cache.

    Raises:
        ModelNotFoundError: neither a directory with ``config.json`` nor a cached snapshot.
    """
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"base directory {path} has no config.json; pass a save_pretrained folder.")
        return path
    text = str(base)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # huggingface_hub raises several types for "not cached"
            pass
    raise ModelNotFoundError(
        f"base model {text!r} is neither a local directory nor in the Hugging Face cache; download it first "
        f"(`huggingface-cli download {text}`) or pass its directory."
    )


def read_config(base_dir: Path) -> dict[str, Any]:
    config = json.loads((base_dir / "config.json").read_text())
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "quantized")
        raise BadInputError(
            f"the base in {base_dir} is stored {method}-quantized; merging into quantized weights loses the update, "
            "so pass the original 16-bit base (and --qlora to reproduce the quantized training base)."
        )
    return config


def config_for_adapter(base: str | Path | None, adapter_base: str | None) -> dict[str, Any]:
    """The base's config.json as a dict: from ``base``, else the adapter's ``base_model_name_or_path``.

    Uses the planner's resolution (local, HF cache, catalog), so composing needs no base weights.
    """
    from hf_ftkit.planner.resolve import _cached_config, _local_config, _read_config, catalog_entry

    name = str(base) if base is not None else adapter_base
    if not name:
        raise BadInputError("the adapter names no base model; pass the base with --base / base=.")
    found = _local_config(name) or _cached_config(name)
    if found is not None:
        return _read_config(found)
    entry = catalog_entry(name)
    if entry is not None:
        return dict(entry["config"])
    raise ModelNotFoundError(f"no config for base {name!r}; pass its local directory.")


def skeleton_model(config: dict[str, Any]) -> Any:
    """The base architecture with weightless parameters (zero-stride views of one zero), for PEFT's adapter maths.

    PEFT's ``add_weighted_adapter`` needs a model to hang adapters on but never reads the base weights for
    LoRA; meta tensors would make the adapters meta too, so each parameter is a broadcast scalar instead.
    """
    import torch

    from hf_ftkit.planner.structure import build_meta_model, config_from_dict

    model = build_meta_model(config_from_dict(config))
    zero = torch.zeros((), dtype=torch.float32)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(zero.expand(param.shape), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, torch.zeros((), dtype=buffer.dtype).expand(buffer.shape), persistent=False)
    return model
