"""hf-ftkit: memory planning, QLoRA fallback, adapter merging and forgetting checks for the HF stack.

Importing the package is cheap: public names load their module (and torch, where needed) on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterSet": "hf_ftkit.merge.hotswap",
    "add_callbacks": "hf_ftkit.callbacks.attach",
    "BadInputError": "hf_ftkit.errors",
    "Comparison": "hf_ftkit.compare.methods",
    "Composition": "hf_ftkit.merge.compose",
    "compare_methods": "hf_ftkit.compare.methods",
    "MergeConfig": "hf_ftkit.merge.config",
    "MergeResult": "hf_ftkit.merge.run",
    "MergeVerificationError": "hf_ftkit.errors",
    "QloraTarget": "hf_ftkit.merge.streaming",
    "compose": "hf_ftkit.merge.compose",
    "inspect_adapters": "hf_ftkit.merge.inspect",
    "merge_adapters": "hf_ftkit.merge.run",
    "DoesNotFitError": "hf_ftkit.errors",
    "ForgettingCallback": "hf_ftkit.forgetting.callback",
    "ForgettingEvaluator": "hf_ftkit.forgetting.evaluator",
    "measure_forgetting": "hf_ftkit.forgetting.compare",
    "stdlib_documents": "hf_ftkit.forgetting.heldout",
    "HfFtkitError": "hf_ftkit.errors",
    "HfFtkitWarning": "hf_ftkit.errors",
    "LadderLimits": "hf_ftkit.fallback.ladder",
    "MemoryBudgetCallback": "hf_ftkit.callbacks.memory",
    "Setup": "hf_ftkit.fallback.ladder",
    "choose_setup": "hf_ftkit.fallback.ladder",
    "ModelNotFoundError": "hf_ftkit.errors",
    "ModelSpec": "hf_ftkit.planner.spec",
    "Plan": "hf_ftkit.planner.estimate",
    "PlanInputs": "hf_ftkit.planner.inputs",
    "parse_budget": "hf_ftkit.planner.budget",
    "plan": "hf_ftkit.planner.api",
    "plan_from_training": "hf_ftkit.planner.from_objects",
    "resolve_model": "hf_ftkit.planner.resolve",
    "suggest": "hf_ftkit.planner.suggest",
    "trace_step": "hf_ftkit.planner.trace",
    "train_with_fallback": "hf_ftkit.fallback.runtime",
    "what_fits": "hf_ftkit.planner.suggest",
}

__all__ = sorted(["__version__", *_EXPORTS])

if TYPE_CHECKING:
    from hf_ftkit.callbacks.attach import add_callbacks
    from hf_ftkit.callbacks.memory import MemoryBudgetCallback
    from hf_ftkit.compare.methods import Comparison, compare_methods
    from hf_ftkit.errors import (
        BadInputError,
        DoesNotFitError,
        HfFtkitError,
        HfFtkitWarning,
        MergeVerificationError,
        ModelNotFoundError,
    )
    from hf_ftkit.fallback.ladder import LadderLimits, Setup, choose_setup
    from hf_ftkit.fallback.runtime import train_with_fallback
    from hf_ftkit.forgetting.callback import ForgettingCallback
    from hf_ftkit.forgetting.compare import measure_forgetting
    from hf_ftkit.forgetting.evaluator import ForgettingEvaluator
    from hf_ftkit.forgetting.heldout import stdlib_documents
    from hf_ftkit.merge.compose import Composition, compose
    from hf_ftkit.merge.config import MergeConfig
    from hf_ftkit.merge.hotswap import AdapterSet
    from hf_ftkit.merge.inspect import inspect_adapters
    from hf_ftkit.merge.run import MergeResult, merge_adapters
    from hf_ftkit.merge.streaming import QloraTarget
    from hf_ftkit.planner.api import plan
    from hf_ftkit.planner.budget import parse_budget
    from hf_ftkit.planner.estimate import Plan
    from hf_ftkit.planner.from_objects import plan_from_training
    from hf_ftkit.planner.inputs import PlanInputs
    from hf_ftkit.planner.resolve import resolve_model
    from hf_ftkit.planner.spec import ModelSpec
    from hf_ftkit.planner.suggest import suggest, what_fits
    from hf_ftkit.planner.trace import trace_step


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_ftkit' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
