"""Budgets: ``24GiB``, ``24GB``, ``80G``, a GPU name from the data file, or ``auto``."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from hf_ftkit._data import load
from hf_ftkit.errors import BadInputError
from hf_ftkit.units import MIB, parse_size


@dataclass(frozen=True)
class Budget:
    """Memory available per device, and where the number came from."""

    bytes: int
    label: str


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def gpu_table() -> dict[str, dict[str, Any]]:
    """Every known GPU by canonical name and alias (normalized keys)."""
    table: dict[str, dict[str, Any]] = {}
    for name, info in load("gpus")["gpus"].items():
        for alias in (name, *info.get("aliases", ())):
            table[_key(alias)] = {"id": name, **info}
    return table


def find_gpu(name: str) -> dict[str, Any] | None:
    return gpu_table().get(_key(name))


def known_gpus() -> list[str]:
    return sorted(load("gpus")["gpus"])


def parse_budget(text: str | int) -> Budget:
    """Resolve a budget string to bytes per device.

    Raises:
        BadInputError: not a size, an unknown GPU name, or ``auto`` without a CUDA device.
    """
    if isinstance(text, int):
        if text <= 0:
            raise BadInputError(f"--budget must be greater than zero, got {text}.")
        return Budget(text, f"{text} bytes")
    value = str(text).strip()
    if value.lower() == "auto":
        return _local_gpu_budget()
    gpu = find_gpu(value)
    if gpu is not None:
        return Budget(int(gpu["memory_mib"] * MIB), f"{gpu['id']} ({gpu['name']})")
    if value[:1].isdigit() or value[:1] == ".":
        return Budget(parse_size(value, what="--budget"), value)
    close = difflib.get_close_matches(value.lower(), known_gpus(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise BadInputError(
        f"--budget {value!r} is neither a size like 24GiB nor a known GPU{hint}; known GPUs: {', '.join(known_gpus())}."
    )


def _local_gpu_budget() -> Budget:
    import torch

    if not torch.cuda.is_available():
        raise BadInputError("--budget auto found no CUDA GPU on this machine; pass a size like 24GiB or a GPU name.")
    props = torch.cuda.get_device_properties(0)
    return Budget(int(props.total_memory), f"auto ({props.name})")
