"""The method table: one frozen description per fine-tuning method, read from ``data/methods.json``.

Everything that differs between methods is looked up here (what is trained, which adapter, whether the
base is 4-bit, the ladder rungs, what `compare` says), so adding a method is one data entry plus its
memory terms. Torch-free: the CLI's start-up reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from hf_ftkit._data import load


@dataclass(frozen=True)
class LadderRung:
    """One rung of the fallback ladder: its place across all methods and the settings it changes."""

    position: int
    name: str
    method: str
    changes: tuple[tuple[str, Any], ...]
    default: bool = True  # on the ladder unless the user names the methods allowed


@dataclass(frozen=True)
class MethodInfo:
    """What a fine-tuning method is, for every part of hf-ftkit that treats methods differently."""

    name: str
    label: str
    trains_all: bool  # every parameter trains (full fine-tuning); else a PEFT adapter on a frozen base
    adapter: str | None  # "lora", "dora" or None
    base_bits: int  # 16, or 4 for a bitsandbytes 4-bit base
    resume_keeps: str
    in_compare: bool
    rungs: tuple[LadderRung, ...]
    deployment: str
    composability: str
    forgetting_risk: str

    @property
    def is_peft(self) -> bool:
        return not self.trains_all

    @property
    def quantized_base(self) -> bool:
        return self.base_bits == 4

    @property
    def dora(self) -> bool:
        return self.adapter == "dora"


@cache
def registry() -> dict[str, MethodInfo]:
    """Every method by name, in the data file's order."""
    table: dict[str, MethodInfo] = {}
    for name, entry in load("methods")["methods"].items():
        rungs = tuple(LadderRung(r["position"], r["name"], name, tuple(sorted(r["changes"].items())),
                                 r.get("default", True)) for r in entry["rungs"])
        table[name] = MethodInfo(
            name=name, label=entry["label"], trains_all=entry["trains"] == "all", adapter=entry["adapter"],
            base_bits=int(entry["base_bits"]), resume_keeps=entry["resume_keeps"], in_compare=entry["in_compare"],
            rungs=rungs, deployment=entry["deployment"], composability=entry["composability"],
            forgetting_risk=entry["forgetting_risk"],
        )
    return table


def method_names() -> tuple[str, ...]:
    return tuple(registry())


def method_info(name: str) -> MethodInfo:
    """The description of ``name``; ``KeyError`` for an unknown method (``PlanInputs`` validates first)."""
    return registry()[name]


def all_rungs() -> list[LadderRung]:
    """Every ladder rung of every method, from highest expected quality to lowest memory."""
    return sorted((r for info in registry().values() for r in info.rungs), key=lambda r: r.position)


def quantized_twin(adapter: str) -> MethodInfo:
    """The method that trains ``adapter`` on a 4-bit base (``lora`` → QLoRA, ``dora`` → QDoRA)."""
    return next(m for m in registry().values() if m.adapter == adapter and m.quantized_base)


def ladder_order(name: str) -> int:
    """Where a method's first ladder rung stands (lower: more memory, higher expected quality)."""
    return min((r.position for r in method_info(name).rungs), default=0)
