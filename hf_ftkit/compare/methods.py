"""Full FT, LoRA, DoRA and QLoRA side by side for one model, GPU, token count and price.

Memory and GPU counts come from the planner; time and cost from FLOPs per token at a stated utilisation;
sizes from the parameter counts. Every number carries its basis: ``planned`` (from the model's
architecture through the planner), ``estimated`` (a formula with stated assumptions), ``literature`` (the
published qualitative reading) or ``measured``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hf_ftkit._data import load
from hf_ftkit.compare.flops import FlopsPerToken, flops_per_token
from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.api import formulas_are_the_plan, plan
from hf_ftkit.planner.budget import find_gpu, known_gpus
from hf_ftkit.planner.estimate import Plan, estimate
from hf_ftkit.planner.inputs import METHODS, PlanInputs
from hf_ftkit.planner.methods import MethodInfo, method_info, quantized_twin, registry
from hf_ftkit.planner.resolve import resolve_model
from hf_ftkit.planner.spec import ModelSpec
from hf_ftkit.planner.states import model_states

Checkpointing = Literal["auto", "on", "off"]
Basis = Literal["planned", "estimated", "literature", "measured"]
MULTI_GPU_SHARDS = ("fsdp", "zero3")
ARTIFACT_BYTES_PER_PARAM = 2  # full weights saved in bf16
ADAPTER_BYTES_PER_PARAM = 4  # PEFT keeps (and saves) adapters in fp32 by default


@dataclass(frozen=True)
class Placement:
    """The fewest GPUs of the chosen kind that fit a method, and the setup that makes it fit."""

    gpus: int
    nodes: int
    gpus_per_node: int
    shard: str
    gradient_checkpointing: bool
    plan: Plan


@dataclass
class MethodRow:
    """One method's column of the comparison."""

    method: str
    trainable_params: int
    total_params: int
    placement: Placement | None
    flops: FlopsPerToken
    hours: float | None
    gpu_hours: float | None
    cost: float | None
    artifact_bytes: int
    checkpoint_bytes: int
    deployment: str
    composability: str
    forgetting_risk: str
    forgetting: dict[str, Any] | None = None
    basis: dict[str, Basis] = field(default_factory=dict)
    hours_range: tuple[float, float] | None = None  # where published slowdowns of the method disagree
    throughput: dict[str, Any] | None = None  # the published factor vs LoRA that the time includes

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.total_params

    def to_dict(self) -> dict[str, Any]:
        p = self.placement
        return {
            "trainable_params": self.trainable_params,
            "trainable_pct": self.trainable_pct,
            "fits": p is not None,
            "min_gpus": p.gpus if p else None,
            "nodes": p.nodes if p else None,
            "shard": p.shard if p else None,
            "gradient_checkpointing": p.gradient_checkpointing if p else None,
            "peak_bytes_per_gpu": p.plan.peak_bytes if p else None,
            "flops_per_token": self.flops.total,
            "flops_breakdown": {k: getattr(self.flops, k) for k in self.flops.__dataclass_fields__},
            "hours": self.hours,
            "hours_range": list(self.hours_range) if self.hours_range else None,
            "throughput_vs_lora": self.throughput,
            "gpu_hours": self.gpu_hours,
            "cost": self.cost,
            "artifact_bytes": self.artifact_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "deployment": self.deployment,
            "composability": self.composability,
            "forgetting_risk": self.forgetting_risk,
            "forgetting": self.forgetting,
            "basis": dict(self.basis),
        }


@dataclass
class Comparison:
    """The whole table: one ``MethodRow`` per method, and what it assumed."""

    model: ModelSpec
    gpu: dict[str, Any]
    tokens: int
    price_per_gpu_hour: float | None
    utilization: float
    inputs: PlanInputs
    rows: dict[str, MethodRow]
    assumptions: list[str]
    max_gpus: int = 512

    def to_dict(self) -> dict[str, Any]:
        """The JSON schema of ``hf-ftkit compare --json``."""
        return {
            "model": self.model.model_id,
            "total_params": self.model.params_total,
            "gpu": {"id": self.gpu["id"], "name": self.gpu["name"], "memory_bytes": gpu_memory_bytes(self.gpu),
                    "bf16_tflops": self.gpu["bf16_tflops"]},
            "tokens": self.tokens,
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "utilization": self.utilization,
            "batch_size": self.inputs.batch_size,
            "seq_len": self.inputs.seq_len,
            "max_gpus": self.max_gpus,
            "methods": {name: row.to_dict() for name, row in self.rows.items()},
            "assumptions": list(self.assumptions),
        }


def gpu_memory_bytes(gpu: dict[str, Any]) -> int:
    return int(gpu["memory_mib"]) * 1024**2


def resolve_gpu(name: str) -> dict[str, Any]:
    """The GPU's row from ``gpus.json``; an unknown name is one sentence listing the known ones."""
    gpu = find_gpu(name)
    if gpu is None:
        raise BadInputError(f"--gpu {name!r} is not a known GPU; known GPUs: {', '.join(known_gpus())}.")
    return gpu


def gpu_counts(max_gpus: int, per_node: int) -> list[int]:
    """Counts tried, smallest first: powers of two within a node, then whole nodes."""
    counts, n = [], 1
    while n < per_node and n <= max_gpus:
        counts.append(n)
        n *= 2
    counts += [per_node * k for k in range(1, max_gpus // per_node + 1)]
    return sorted(set(c for c in counts if c <= max_gpus))


def find_placement(spec: ModelSpec, inputs: PlanInputs, budget_bytes: int, *, checkpointing: Checkpointing = "auto",
                   max_gpus: int = 512, per_node: int = 8) -> Placement | None:
    """The fewest GPUs (then: no recompute over recompute, then the lower peak) that fit ``inputs``."""
    options = {"auto": (False, True), "on": (True,), "off": (False,)}[checkpointing]
    for count in gpu_counts(max_gpus, per_node):
        nodes, gpus = (1, count) if count <= per_node else (count // per_node, per_node)
        for recompute in options:
            bounded: list[tuple[int, int, PlanInputs]] = []
            for index, shard in enumerate(("none",) if count == 1 else MULTI_GPU_SHARDS):
                changes: dict[str, Any] = {"gpus": gpus, "nodes": nodes, "shard": shard,
                                           "gradient_checkpointing": recompute}
                if inputs.quantized_base and shard != "none":
                    changes["quant_storage"] = "bf16"  # FSDP/ZeRO-3 can only shard 4-bit weights stored as bf16
                candidate = inputs.replace(**changes)
                # the plan without the allocator's slack is a lower bound of the plan's peak (the replay of the
                # allocator is most of a plan's time): past the budget, or past the best peak found, it is final
                bound = 0
                if formulas_are_the_plan(spec, candidate):
                    bound = estimate(spec, candidate, slack=False).peak_bytes
                if bound <= budget_bytes:
                    bounded.append((bound, index, candidate))
            best: tuple[int, int, Plan] | None = None  # (peak, shard's index: the tie-break, plan)
            for bound, index, candidate in sorted(bounded, key=lambda item: item[:2]):
                if best is not None and (bound, index) > best[:2]:
                    break
                result = plan(spec, candidate, budget=budget_bytes)
                if result.fits and (best is None or (result.peak_bytes, index) < best[:2]):
                    best = (result.peak_bytes, index, result)
            if best is not None:
                return Placement(count, nodes, gpus, best[2].inputs.shard, recompute, best[2])
    return None


def read_forgetting_report(path: str | Path) -> dict[str, Any]:
    """The numbers ``compare`` shows from an ``hf-ftkit forgetting --json`` report."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        base, tuned = data["base"]["bits_per_byte"], data["tuned"]["bits_per_byte"]
        kl = data.get("kl")
    except FileNotFoundError:
        raise BadInputError(f"forgetting report {file} does not exist; write one with "
                            "`hf-ftkit forgetting ... --json > report.json`.") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise BadInputError(f"{file} is not an `hf-ftkit forgetting --json` report (it needs base.bits_per_byte "
                            "and tuned.bits_per_byte).") from None
    return {"bits_per_byte_delta_pct": 100.0 * (tuned - base) / base, "kl": kl, "report": str(file)}


def _row(spec: ModelSpec, inputs: PlanInputs, gpu: dict[str, Any], tokens: int, price: float | None,
         utilization: float, placement: Placement | None, forgetting: dict[str, Any] | None) -> MethodRow:
    facts = inputs.info
    timed = inputs.replace(gradient_checkpointing=placement.gradient_checkpointing) if placement else inputs
    flops = flops_per_token(spec, timed)
    hours = gpu_hours = cost = hours_range = None
    throughput = slowdown(inputs.method)
    if placement is not None:
        # DoRA and QLoRA: LoRA's FLOPs time times their published slowdown (their extra work is mostly
        # memory-bound: weight norms, 4-bit dequantization), so FLOPs alone would call them as fast as LoRA
        timed_flops = flops.total if throughput is None else flops_per_token(spec, timed.replace(method="lora")).total
        base_hours = tokens * timed_flops / (placement.gpus * gpu["bf16_tflops"] * 1e12 * utilization) / 3600
        hours = base_hours * (throughput["factor"] if throughput else 1.0)
        if throughput:
            hours_range = (base_hours * throughput["range"][0], base_hours * throughput["range"][1])
        gpu_hours = hours * placement.gpus
        cost = gpu_hours * price if price is not None else None
    states = model_states(spec, timed)
    if not inputs.is_peft:
        artifact = ARTIFACT_BYTES_PER_PARAM * spec.params_total
        checkpoint = states.weights + states.optimizer_states
    else:
        artifact = ADAPTER_BYTES_PER_PARAM * states.trainable_params
        checkpoint = states.adapter_weights + states.optimizer_states
    basis: dict[str, Basis] = {"trainable_params": "planned", "peak_bytes_per_gpu": "planned", "min_gpus": "planned",
                               "flops_per_token": "estimated", "hours": "estimated", "cost": "estimated",
                               "artifact_bytes": "estimated", "checkpoint_bytes": "estimated",
                               "forgetting_risk": "measured" if forgetting else "literature"}
    risk = facts.forgetting_risk
    if forgetting:
        risk = f"measured: {forgetting['bits_per_byte_delta_pct']:+.2f}% bits/byte"
        if forgetting.get("kl") is not None:
            risk += f", KL {forgetting['kl']:.4f}"
    return MethodRow(
        method=inputs.method, trainable_params=states.trainable_params, total_params=spec.params_total,
        placement=placement, flops=flops, hours=hours, gpu_hours=gpu_hours, cost=cost, artifact_bytes=int(artifact),
        checkpoint_bytes=int(checkpoint), deployment=facts.deployment, composability=facts.composability,
        forgetting_risk=risk, forgetting=forgetting, basis=basis, hours_range=hours_range, throughput=throughput,
    )


def slowdown(method: str) -> dict[str, Any] | None:
    """The published training-time factor of ``method`` vs LoRA (``data/throughput.json``): the median as
    ``factor``, the smallest and largest as ``range``, and the sources; None for full FT and LoRA."""
    import statistics

    entries = load("throughput")["methods"].get(method)
    if not entries:
        info = method_info(method)
        if info.quantized_base and info.adapter not in (None, "lora"):
            return _composed_slowdown(info)
        return None
    factors = [float(e["factor"]) for e in entries]
    return {"factor": statistics.median(factors), "range": [min(factors), max(factors)],
            "sources": [{k: e[k] for k in ("factor", "model", "gpu", "figures", "source")} for e in entries]}


def _composed_slowdown(info: MethodInfo) -> dict[str, Any] | None:
    """No published timing of this adapter on a 4-bit base (QDoRA): the adapter's factor times 4-bit's."""
    adapter = next((m.name for m in registry().values() if m.adapter == info.adapter and not m.quantized_base), None)
    first = slowdown(adapter) if adapter else None
    second = slowdown(quantized_twin("lora").name)
    if first is None or second is None:
        return None
    return {"factor": first["factor"] * second["factor"],
            "range": [first["range"][0] * second["range"][0], first["range"][1] * second["range"][1]],
            "sources": [*first["sources"], *second["sources"]],
            "composed": f"no published {info.label} timing: {adapter}'s factor x QLoRA's (estimated)"}


def _assumptions(inputs: PlanInputs, gpu: dict[str, Any], utilization: float, checkpointing: Checkpointing,
                 per_node: int) -> list[str]:
    recompute = {"auto": "only where needed to fit", "on": "on", "off": "off"}[checkpointing]
    return [
        f"memory (planned): hf-ftkit's planner, micro-batch {inputs.batch_size} x {inputs.seq_len} tokens per GPU, "
        f"{inputs.precision}, {inputs.optim}, LoRA/DoRA r={inputs.lora_r} on {inputs.lora_targets}, QLoRA "
        f"{inputs.quant_type} with double quantization; one GPU unsharded, several with FSDP full_shard or "
        f"ZeRO-3 ({per_node} GPUs per node), whichever peaks lower; gradient checkpointing {recompute}.",
        f"time (estimated): training FLOPs per token x tokens / (GPUs x {gpu['bf16_tflops']:g} TFLOP/s bf16 peak "
        f"x {utilization:.0%} utilisation), scaling linearly with GPUs. Full FT = 6 x matmul params + attention; "
        "frozen-base methods skip the base's weight gradients (4 x) and add 6 x adapter params; recompute adds "
        "a forward. DoRA and QLoRA: LoRA's time x their published slowdown vs LoRA (median, range in brackets: "
        "DoRA 1.24-1.56x from PEFT's MetaMathQA results, QLoRA 1.08-2.05x from LitGPT's config tables; larger "
        "at small micro-batches); QDoRA, unpublished, DoRA's factor x QLoRA's; sources in --json "
        "`throughput_vs_lora`.",
        "cost (estimated): GPU-hours x the given price per GPU-hour.",
        "size on disk (estimated): full weights in bf16; adapters in fp32 (PEFT's default); a resumable "
        "checkpoint adds the optimizer states.",
        "forgetting risk: qualitative reading of Biderman et al. 2024 unless a measured report is given; "
        "hf-ftkit's own SmolLM2 experiment found LoRA forgetting more than full FT on one narrow task "
        "(docs/experiments/forgetting.md), so measure yours with `hf-ftkit forgetting`.",
    ]


def compare_methods(
    model: str | ModelSpec,
    *,
    gpu: str = "h100",
    tokens: int = 50_000_000,
    price_per_gpu_hour: float | None = None,
    inputs: PlanInputs | None = None,
    utilization: float = 0.4,
    checkpointing: Checkpointing = "auto",
    max_gpus: int = 512,
    gpus_per_node: int = 8,
    forgetting: Mapping[str, str | Path] | None = None,
    allow_online: bool = False,
) -> Comparison:
    """Compare full FT, LoRA, DoRA and QLoRA for ``model`` on ``gpu``.

    Args:
        model: hub id, checkpoint directory, config.json path, or a ``ModelSpec``.
        gpu: a GPU name from ``hf_ftkit/data/gpus.json`` (memory and bf16 peak throughput).
        tokens: training tokens (all epochs together).
        price_per_gpu_hour: price of one GPU for one hour; no cost is given without it.
        inputs: batch size, sequence length, optimizer, precision, LoRA rank ... (the method is replaced).
        utilization: the fraction of peak throughput training reaches (model FLOPs utilisation).
        checkpointing: gradient checkpointing ``auto`` (only where it saves GPUs), ``on`` or ``off``.
        max_gpus: the most GPUs tried before a method is reported as not fitting.
        gpus_per_node: GPUs per node for multi-node counts.
        forgetting: ``{method: path}`` of ``hf-ftkit forgetting --json`` reports, shown as measured risk.

    Example:
        >>> from hf_ftkit.compare import compare_methods
        >>> table = compare_methods("meta-llama/Llama-3.1-70B", gpu="h100", tokens=50_000_000, price_per_gpu_hour=2.5)
        >>> table.rows["qlora"].placement.gpus
        1
    """
    if tokens <= 0:
        raise BadInputError(f"--tokens must be greater than zero, got {tokens}.")
    if price_per_gpu_hour is not None and (price_per_gpu_hour < 0 or not math.isfinite(price_per_gpu_hour)):
        raise BadInputError(f"--price-per-gpu-hour must be zero or more, got {price_per_gpu_hour}.")
    if not 0 < utilization <= 1:
        raise BadInputError(f"--utilization must be in (0, 1], got {utilization}; 0.4 is typical.")
    if max_gpus < 1 or gpus_per_node < 1:
        raise BadInputError("--max-gpus and --gpus-per-node must be at least 1.")
    unknown = sorted(set(forgetting or {}) - set(METHODS))
    if unknown:
        raise BadInputError(f"--forgetting names unknown method {unknown[0]!r}; use one of {', '.join(METHODS)}.")
    card = resolve_gpu(gpu)
    spec = model if isinstance(model, ModelSpec) else resolve_model(str(model), allow_online=allow_online)
    base = inputs or PlanInputs()
    reports = {name: read_forgetting_report(path) for name, path in (forgetting or {}).items()}
    rows = {}
    for method in (name for name in METHODS if method_info(name).in_compare):
        method_inputs = base.replace(method=method, gpus=1, nodes=1, shard="none")
        placement = find_placement(spec, method_inputs, gpu_memory_bytes(card), checkpointing=checkpointing,
                                   max_gpus=max_gpus, per_node=gpus_per_node)
        rows[method] = _row(spec, method_inputs, card, tokens, price_per_gpu_hour, utilization, placement,
                            reports.get(method))
    return Comparison(model=spec, gpu=card, tokens=tokens, price_per_gpu_hour=price_per_gpu_hour,
                      utilization=utilization, inputs=base, rows=rows,
                      assumptions=_assumptions(base, card, utilization, checkpointing, gpus_per_node),
                      max_gpus=max_gpus)
