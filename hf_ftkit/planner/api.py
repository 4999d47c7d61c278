"""The planner's public entry points."""

from __future__ import annotations

import warnings
from typing import Any

from hf_ftkit.errors import BadInputError, HfFtkitError, HfFtkitWarning, first_line, raised_by, raised_in
from hf_ftkit.planner import layer_trace
from hf_ftkit.planner.budget import parse_budget
from hf_ftkit.planner.estimate import Plan, estimate, with_extra_activations
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.resolve import resolve_model
from hf_ftkit.planner.spec import ModelSpec


def _as_spec(model: str | ModelSpec, allow_online: bool) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else resolve_model(str(model), allow_online=allow_online)


def plan(
    model: str | ModelSpec,
    inputs: PlanInputs | None = None,
    *,
    budget: str | int | None = None,
    exact: bool = False,
    allow_online: bool = False,
    **overrides: Any,
) -> Plan:
    """Plan the per-device GPU memory of a fine-tuning run.

    Args:
        model: hub id, checkpoint directory, path to config.json, or a resolved ``ModelSpec``.
        inputs: the run's configuration; fields can also be passed as keyword overrides.
        budget: ``"24GiB"``, ``"80G"``, a GPU name (``"a100-80gb"``), ``"auto"`` or bytes.
        exact: trace the full model step under FakeTensorMode instead of the analytic formulas
            (minutes for large models; single device only).
        allow_online: fetch config.json from the hub when it is found nowhere offline.

    Example:
        >>> import hf_ftkit
        >>> p = hf_ftkit.plan("meta-llama/Llama-3.1-8B", method="qlora", budget="24GiB")
        >>> p.fits
        True
    """
    try:
        inputs = (inputs or PlanInputs()).replace(**overrides) if overrides else (inputs or PlanInputs())
    except TypeError as exc:
        valid = ", ".join(PlanInputs.field_names())
        raise BadInputError(f"unknown plan option ({exc}); valid options: {valid}.") from exc
    spec = _as_spec(model, allow_online)
    resolved = parse_budget(budget) if budget is not None else None
    if resolved is not None and (resolved.bytes < 1 or isinstance(budget, str) and resolved.bytes < MIN_BUDGET_BYTES):
        raise BadInputError(f"--budget {budget} is {resolved.bytes} bytes, less than any GPU has; pass a size like "
                            "24GiB or a GPU name.")
    check_targets(spec, inputs)
    result = estimate(spec, inputs, resolved.bytes if resolved else None, resolved.label if resolved else None)
    for message in intent_warnings(spec, inputs):
        result.warnings.append(message)
        warnings.warn(message, HfFtkitWarning, stacklevel=2)
    reason = _formulas_unproven(spec, inputs)
    if exact:
        result = _exact_plan(spec, result)
    elif reason:
        result = _traced_layers(spec, inputs, result, reason)
    return result


def formulas_are_the_plan(spec: ModelSpec, inputs: PlanInputs) -> bool:
    """:func:`plan` (not exact) is :func:`estimate`'s arithmetic, with no traced layers added: then
    ``estimate(..., slack=False)`` is a lower bound of its peak."""
    return _formulas_unproven(spec, inputs) is None


def _formulas_unproven(spec: ModelSpec, inputs: PlanInputs) -> str | None:
    """Why the formulas do not hold for this run, which is then planned from its traced layers; None where they do."""
    if not layer_trace.validated(spec.model_type):
        return f"{spec.model_type} is not among the architectures whose memory formulas were validated against traces"
    if _adapts_fused_experts(spec, inputs):
        return ("PEFT's all-linear also adapts this MoE model's fused expert weights, through a merged copy of each "
                "layer's experts that the formulas do not model")
    if inputs.activation_offloading and not inputs.gradient_checkpointing:
        return ("activation offloading without checkpointing leaves on the device, in every layer, each tensor saved "
                "twice in a row (TRL offloads a storage once), which the formulas do not model")
    return None


def _adapts_fused_experts(spec: ModelSpec, inputs: PlanInputs) -> bool:
    """All-linear LoRA on an MoE model whose experts are 3-D parameters (transformers 5), not one nn.Linear per
    expert: PEFT wraps those parameters too."""
    fused = spec.is_moe and not any(g.count >= spec.num_layers * spec.num_experts for g in spec.linears)
    return fused and inputs.is_peft and inputs.target_names() is None


def _traced_layers(spec: ModelSpec, inputs: PlanInputs, result: Plan, reason: str) -> Plan:
    """Where the formulas were not validated (``reason``): the traced per-layer memory, and a warning either
    way."""
    traced = layer_trace.traced_allocated_peak(spec, inputs)
    if isinstance(traced, layer_trace.TraceFailed) and traced.peft_refused:
        message = (f"{reason}, and PEFT refuses this adapter configuration on its layers ({traced.reason}): the run "
                   "would fail the same way, so change the LoRA settings it names; this plan is the formulas'.")
    elif isinstance(traced, layer_trace.TraceFailed):
        message = (f"{reason}, and tracing it failed here ({traced.reason}): the plan may be low; check it with "
                   "--exact.")
    else:
        single = estimate(spec, layer_trace.traced_inputs(inputs))
        extra = traced.peak_bytes - single.allocated_peak_bytes  # each phase extrapolated: it holds both ways
        result = with_extra_activations(result, extra)
        layers = f"a few decoder layers of each of its {traced.kinds} kinds" if traced.kinds > 1 \
            else "1 and 2 decoder layers"
        message = (f"{reason}: its per-layer memory was traced with {layers} instead "
                   f"({extra / 2**20:+,.0f} MiB against the formulas).")
    result.warnings.append(message)
    warnings.warn(message, HfFtkitWarning, stacklevel=3)
    return result


MIN_BUDGET_BYTES = 2**20
_WHOLE_MODULES = ("embed_tokens", "wte", "embeddings", "embed_in", "lm_head", "embed_out")  # what the planner counts


def check_targets(spec: ModelSpec, inputs: PlanInputs) -> None:
    """LoRA targets that match no linear of the model would plan (and train) zero parameters: refuse them."""
    from hf_ftkit.planner.activations import lora_targets

    if inputs.is_peft and inputs.target_names() is not None and not lora_targets(spec, inputs):
        known = ", ".join(sorted({g.name for g in spec.linears}))
        raise BadInputError(f"--lora-targets {inputs.lora_targets} matches no linear layer of {spec.model_id} (it "
                            f"has {known}); pass some of those or all-linear.")


def intent_warnings(spec: ModelSpec, inputs: PlanInputs) -> list[str]:
    """Settings that plan fine but cannot be what the user meant, or that the run treats differently than the
    user may expect."""
    found = []
    linears = {g.name for g in spec.linears}
    unknown = [m for m in inputs.modules_to_save if m not in linears and m not in _WHOLE_MODULES]
    if inputs.is_peft and unknown:
        found.append(f"--modules-to-save {','.join(unknown)} matches no module hf-ftkit knows in {spec.model_id} "
                     f"(known: {', '.join(_WHOLE_MODULES)} and the linears); it adds nothing to this plan.")
    if _adapts_fused_experts(spec, inputs) and inputs.lora_dropout > 0:
        found.append("Recent PEFT's all-linear also wraps this MoE model's fused expert parameters and refuses "
                     "lora_dropout > 0 on them: get_peft_model will fail; pass --lora-dropout 0 or name the "
                     "targets (e.g. q_proj,k_proj,v_proj,o_proj).")
    if not inputs.is_peft and inputs.modules_to_save:
        found.append("--modules-to-save has no effect with --method full, which trains every module.")
    if inputs.world_size == 1 and inputs.shard in ("fsdp", "zero1", "zero2", "zero3") and inputs.offload == "none":
        found.append(f"--shard {inputs.shard} on one GPU shards nothing: the plan is a single device's; add --gpus "
                     "or --offload.")
    if spec.max_position and inputs.seq_len > spec.max_position:
        found.append(f"--seq-len {inputs.seq_len} is longer than {spec.model_id}'s context of {spec.max_position} "
                     "tokens; the plan assumes the model is extended to it (e.g. RoPE scaling).")
    kept = sorted({g.name for g in spec.linears if not g.quantizable})
    if inputs.quantized_base and kept:
        share = 1 - spec.params_quantizable / spec.params_linear
        found.append(f"transformers' bitsandbytes integration quantizes only nn.Linear and Conv1D modules: "
                     f"{spec.model_id}'s {', '.join(kept)} ({share:.0%} of its decoder linear weights) are subclasses "
                     "and stay in 16-bit under load_in_4bit; the plan counts them so.")
    return found


def _exact_plan(spec: ModelSpec, analytic: Plan) -> Plan:
    """Replace the allocated part of ``analytic`` with a traced step's peak."""
    from hf_ftkit._data import load
    from hf_ftkit.planner.allocator import replay
    from hf_ftkit.planner.structure import config_from_dict
    from hf_ftkit.planner.trace import trace_step

    inputs = analytic.inputs
    if inputs.world_size > 1:
        raise BadInputError("--exact traces one device; drop --gpus/--nodes/--shard or use the analytic plan.")
    traceable = layer_trace.traced_inputs(inputs)
    try:
        traced = trace_step(config_from_dict(dict(spec.config)), traceable)
    except HfFtkitError:
        raise
    except Exception as exc:
        if not (isinstance(exc, ValueError) and raised_by(exc, "peft")):
            # a model the tracer cannot run here: one sentence, not torch's traceback
            raise HfFtkitError(f"--exact could not trace {spec.model_id} here ({type(exc).__name__} in "
                               f"{raised_in(exc) or '?'}: {first_line(exc, 160).rstrip('.')}); plan it without "
                               "--exact.") from exc
        # PEFT refused to wrap the model: the run itself would fail the same way, so the plan says so, as PEFT does
        hint = " (an MoE model's all-linear includes its experts' fused parameters)" if spec.is_moe else ""
        raise BadInputError(f"PEFT refuses this adapter configuration{hint} ({first_line(exc, 300).rstrip('.')}); "
                            "change the LoRA settings it names, as the run would fail the same way.") from exc
    untraced = 0
    left_out = layer_trace.untraced_options(inputs)
    if left_out:  # what they change is the formulas' figure
        untraced = analytic.allocated_peak_bytes - estimate(spec, traceable).allocated_peak_bytes
        message = (f"The step was traced without {' and without '.join(left_out)}; what that changes is the "
                   f"formulas' figure ({untraced / 2**20:+,.0f} MiB).")
        analytic.warnings.append(message)
        warnings.warn(message, HfFtkitWarning, stacklevel=3)
    constants = load("constants")
    replayed = replay(traced.events)  # the traced step's own allocations through the allocator model
    cats = traced.by_category
    breakdown = {
        "weights": cats.get("PARAM", 0) + cats.get("BUFFER", 0),
        "gradients": cats.get("GRAD", 0),
        "optimizer_states": cats.get("OPT", 0),
        "activations": cats.get("ACT", 0) + untraced,
        "transient": cats.get("TEMP", 0) + cats.get("OTH", 0),
        "fragmentation": replayed.peak_reserved - replayed.peak_requested,
        "comm_buffers": 0,  # one device: no communicator
        "cuda_context": int(constants["cuda_context_bytes"]),
    }
    return Plan(
        model=spec, inputs=inputs, peak_bytes=sum(breakdown.values()),
        allocated_peak_bytes=traced.peak_bytes + untraced, breakdown=breakdown, peak_phase="traced",
        trainable_params=analytic.trainable_params, budget_bytes=analytic.budget_bytes,
        budget_label=analytic.budget_label, warnings=analytic.warnings,
    )
