"""A recipe's memory plan on its declared hardware, and the setup ``hf-ftkit train`` runs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from hf_ftkit.errors import HfFtkitWarning
from hf_ftkit.fallback.ladder import LadderLimits, Rung, Setup, choose_setup
from hf_ftkit.planner.api import plan
from hf_ftkit.planner.budget import parse_budget
from hf_ftkit.planner.estimate import Plan, estimate
from hf_ftkit.planner.from_objects import attention_name, inputs_from_training, plan_precision
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.resolve import resolve_model
from hf_ftkit.planner.spec import ModelSpec
from hf_ftkit.recipes.arguments import Hardware, parse_hardware
from hf_ftkit.recipes.loading import Recipe

HALF = ("bfloat16", "float16", "auto")  # "auto" loads most checkpoints in bf16


@dataclass
class RecipePlan:
    """The plan of a recipe's run per device, and the setup to train (with its ladder)."""

    spec: ModelSpec
    hardware: Hardware | None
    setup: Setup
    budget_label: str | None

    @property
    def plan(self) -> Plan:
        return self.setup.plan

    @property
    def fits(self) -> bool | None:
        return self.plan.fits

    def to_dict(self) -> dict[str, Any]:
        data = self.plan.to_dict()
        data["hardware"] = self.hardware.label if self.hardware else None
        data["chosen"] = self.setup.chosen_dict()
        data["ladder"] = [{"rung": r.name, "method": r.inputs.method, "peak_bytes": r.peak_bytes, "fits": r.fits,
                           "verdict": r.reason} for r in self.setup.ladder]
        return data


def recipe_inputs(recipe: Recipe, spec: ModelSpec, hardware: Hardware | None) -> PlanInputs:
    """What the recipe's run does, as the planner's inputs."""
    from trl import get_peft_config, get_quantization_config

    m, t, f = recipe.model, recipe.training, recipe.ftkit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = get_peft_config(m)
        quant = get_quantization_config(m)
    gpus, nodes = (hardware.gpus, hardware.nodes) if hardware and hardware.gpu else (1, 1)
    inputs = inputs_from_training(t, lora, quant, seq_len=t.max_length or 1024, world_size=gpus,
                                  model_type=spec.model_type)
    changes: dict[str, Any] = {"nodes": nodes, "gpus": gpus}
    loaded = "bf16" if str(m.dtype) in HALF else "fp32"
    changes["precision"] = plan_precision(inputs.method, bool(t.bf16), bool(t.fp16), loaded)
    changes["kbit_upcast"] = loaded == "fp32"  # a 4-bit base's unquantized weights (embeddings, norms) stay fp32
    attention = attention_name(m.attn_implementation)  # what `hf-ftkit train` loads the model with
    if attention:
        changes["attn_implementation"] = attention
    if f.shard:
        changes["shard"] = f.shard
    elif gpus * nodes > 1 and inputs.shard == "none":
        changes["shard"] = "ddp"
    return inputs.replace(**changes)


def plan_recipe(recipe: Recipe) -> RecipePlan:
    """Plan the recipe on its declared hardware; with ``method: auto``, choose the setup from the ladder.

    Example:
        >>> rp = plan_recipe(load_recipe("recipes/llama-3.1/8b_qlora.yaml"))
        >>> rp.fits, rp.plan.peak_bytes
    """
    f = recipe.ftkit
    spec = resolve_model(str(recipe.model.model_name_or_path))
    hardware = parse_hardware(f.hardware) if f.hardware else None
    budget = f.budget or (hardware.gpu if hardware and hardware.gpu else None)
    inputs = recipe_inputs(recipe, spec, hardware)
    limits = LadderLimits(allow_full=f.allow_full, min_lora_r=f.min_lora_r, fixed_micro_batch=f.fixed_micro_batch)
    label = parse_budget(budget).label if budget else None
    if f.method == "auto":
        assert budget is not None  # validate() requires it
        return RecipePlan(spec, hardware, choose_setup(spec, budget, inputs, limits), label)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HfFtkitWarning)  # kept in the plan's warnings
        own = plan(spec, inputs, budget=budget)
    name = f"{inputs.method} (recipe)"
    budget_bytes = own.budget_bytes or 0
    ladder = [Rung(name, inputs, own.peak_bytes, bool(own.fits), "the recipe's own setup")]
    if f.fallback and budget:
        ladder += _rungs_below(spec, inputs, limits, budget_bytes)
    return RecipePlan(spec, hardware, Setup(model=spec, plan=own, name=name, budget_bytes=budget_bytes,
                                            ladder=ladder), label)


def _rungs_below(spec: ModelSpec, inputs: PlanInputs, limits: LadderLimits, budget: int) -> list[Rung]:
    """The ladder's rungs after the recipe's method (what an out-of-memory error steps down to)."""
    from hf_ftkit.fallback.ladder import ladder_rungs
    from hf_ftkit.planner.methods import ladder_order

    rungs = ladder_rungs(inputs, limits)
    start = next((i for i, (_, r) in enumerate(rungs) if ladder_order(r.method) > ladder_order(inputs.method)),
                 len(rungs))
    out = []
    for name, rung in rungs[start:]:
        p = estimate(spec, rung, budget)
        out.append(Rung(name, rung, p.peak_bytes, bool(p.fits), "fallback"))
    return out
