"""Facts about this machine and its libraries, for bug reports (``hf-ftkit env``)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "safetensors",
             "huggingface_hub", "deepspeed", "rich")


def collect() -> dict[str, Any]:
    """Library versions, the torch build, accelerators with their memory, and the bitsandbytes backend."""
    from hf_ftkit import __version__

    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "hf_ftkit": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": _ram(),
        "libraries": versions,
        "torch_build": _torch_build(),
        "gpus": _gpus(),
        "bitsandbytes_backend": _bnb_backend(),
    }


def _ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _torch_build() -> dict[str, Any]:
    import torch

    return {"version": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "debug": torch.version.debug}


def _gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [{"name": torch.cuda.get_device_name(i), "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
             "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
            for i in range(torch.cuda.device_count())]


def _bnb_backend() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return None
    import torch

    if torch.cuda.is_available():
        return "hip" if getattr(torch.version, "hip", None) else "cuda"
    return "cpu"
