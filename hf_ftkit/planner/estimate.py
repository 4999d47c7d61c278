"""Assemble a per-device memory plan from model states, activations and sharding."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from hf_ftkit._data import load
from hf_ftkit.planner import activations as act
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.reserved import allocator_slack
from hf_ftkit.planner.spec import ModelSpec
from hf_ftkit.planner.states import ModelStates, head_gradient_bytes, model_states

# Breakdown keys, in display order. The last two are not part of what a tracer or
# torch.cuda.max_memory_allocated sees, but they do take device memory: "fragmentation" is the caching
# allocator's reserved-minus-requested bytes (modelled by replaying the step's tensors through a model of
# the allocator, see planner/reserved.py), "comm_buffers" NCCL's communicator buffers on each rank of a
# multi-GPU run, "cuda_context" the fixed context and library workspaces.
COMPONENTS = (
    "weights",
    "adapter_weights",
    "quant_constants",
    "gradients",
    "optimizer_states",
    "activations",
    "logits_loss",
    "transient",
    "sharding_buffers",
    "fragmentation",
    "comm_buffers",
    "cuda_context",
)
FIXED = ("cuda_context", "comm_buffers", "fragmentation")


def comm_buffer_bytes(inputs: PlanInputs) -> int:
    """NCCL's device buffers for one communicator on each rank, outside PyTorch's allocator (0 on one GPU).

    From a measurement through PyTorch on 4x A100 with NVLink (NVIDIA/nccl#964): 544 MB for a group of two
    GPUs, 688 MB for more. NCCL's memory grows with its channel count (NVIDIA/nccl#986), so NVLink-rich GPUs can
    hold more; a plan is a floor there."""
    if inputs.world_size <= 1:
        return 0
    constants = load("constants")
    return int(constants["nccl_two_ranks_bytes" if inputs.world_size == 2 else "nccl_bytes"])


@dataclass
class Plan:
    """A per-device memory plan.

    Attributes:
        peak_bytes: the reserved peak plus the CUDA context: what must fit the budget.
        allocated_peak_bytes: bytes the step's tensors hold at the peak (comparable to
            ``torch.cuda.max_memory_allocated`` and to a trace).
        reserved_peak_bytes (property): the caching allocator's reserved peak, allocated plus its slack
            (comparable to ``torch.cuda.max_memory_reserved``).
        breakdown: bytes per component at the peak (sums to ``peak_bytes``).
        peak_phase: where the peak happens (``forward``, ``backward``, ``optimizer``).
        budget_bytes: the budget compared against, if any.
        inputs: the resolved configuration.
    """

    model: ModelSpec
    inputs: PlanInputs
    peak_bytes: int
    allocated_peak_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    trainable_params: int
    budget_bytes: int | None = None
    budget_label: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def reserved_peak_bytes(self) -> int:
        return self.allocated_peak_bytes + self.breakdown["fragmentation"]

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON schema of ``hf-ftkit plan --json``."""
        return {
            "model": self.model.model_id,
            "peak_bytes": self.peak_bytes,
            "allocated_peak_bytes": self.allocated_peak_bytes,
            "reserved_peak_bytes": self.reserved_peak_bytes,
            "peak_phase": self.peak_phase,
            "breakdown": dict(self.breakdown),
            "fits": self.fits,
            "budget_bytes": self.budget_bytes,
            "budget": self.budget_label,
            "headroom_bytes": self.headroom_bytes,
            "trainable_params": self.trainable_params,
            "total_params": self.model.params_total,
            "inputs": {"model": self.model.model_id, **self.inputs.to_dict()},
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class _Sharded:
    weights: float
    adapter_weights: float
    quant_constants: float
    gradients: float
    optimizer_states: float
    optimizer_step_temp: float
    persistent_buffers: float  # DDP buckets
    gathered: float  # FSDP/ZeRO-3 unsharded units alive during compute


def _deepspeed_mixed(inputs: PlanInputs) -> bool:
    return inputs.shard.startswith("zero") and act.fp32_master(inputs)


def shard_states(states: ModelStates, spec: ModelSpec, inputs: PlanInputs) -> _Sharded:
    """Per-device share of the model states, and the buffers sharding adds."""
    n = inputs.world_size
    if inputs.shard == "fsdp" and inputs.fsdp_strategy == "hybrid_shard":
        n = inputs.gpus
    w, a, q = states.weights, states.adapter_weights, states.quant_constants
    g, s, temp = states.gradients, states.optimizer_states, states.optimizer_step_temp
    buffers = gathered = 0.0
    if _deepspeed_mixed(inputs):
        # DeepSpeed keeps bf16 weights and grads on the device; the optimizer partition holds the fp32
        # master weights and an fp32 gradient copy beside the Adam states: 2 + 18/N B/param for ZeRO-2,
        # as DeepSpeed's own estimator counts it.
        w, g, s = w / 2, g / 2, s + 2 * w
    c = act.compute_bytes(inputs)
    unit = spec.params_largest_layer
    if inputs.shard == "ddp":
        buffers = g  # gradient buckets (gradient_as_bucket_view=False)
    elif inputs.shard == "zero1":
        s, temp = s / n, temp / n
    elif inputs.shard == "zero2" or (inputs.shard == "fsdp" and inputs.fsdp_strategy == "shard_grad_op"):
        g, s, temp = g / n, s / n, temp / n
        buffers = 4.0 * spec.hidden_size**2 if inputs.shard == "zero2" else c * unit
    elif inputs.shard in ("zero3", "fsdp"):
        # bitsandbytes keeps a 4-bit weight's constants in its quant_state, neither parameter nor buffer:
        # FSDP and ZeRO-3 shard the packed weight only, and every rank holds all constants
        w, a, g, s, temp = w / n, a / n, g / n, s / n, temp / n
        prefetch = load("constants")["fsdp_prefetch_layers"]
        share = spec.params_quantizable / spec.params_linear if inputs.quantized_base and spec.params_linear else 0.0
        base_unit_bytes = (0.5 * share + c * (1 - share)) * unit
        # two layers gathered (current + prefetch) plus the root unit's embedding / lm_head
        gathered = prefetch * base_unit_bytes + c * (spec.params_embedding + spec.params_lm_head)
        if not inputs.is_peft:
            gathered += c * unit  # unsharded gradient of the layer being reduced
    if inputs.offload in ("optimizer", "params"):
        s, temp = 0.0, 0.0
        if inputs.shard in ("zero2", "zero3"):
            g = 0.0  # ZeRO-Offload moves gradient partitions to host memory as well
    if inputs.offload == "params":
        w = 0.0  # the packed weights; their quant_state constants stay on the device
    return _Sharded(w, a, q, g, s, temp, buffers, gathered)


def with_extra_activations(plan: Plan, extra: int) -> Plan:
    """``plan`` with ``extra`` bytes of activations (allocated; fewer when negative, never below none); the
    allocator's slack is kept."""
    extra = max(extra, -plan.breakdown["activations"])
    if extra == 0:
        return plan
    breakdown = dict(plan.breakdown)
    breakdown["activations"] += extra
    allocated = plan.allocated_peak_bytes + extra
    return replace(plan, breakdown=breakdown, allocated_peak_bytes=allocated, peak_bytes=sum(breakdown.values()))


def _activation_phases(spec: ModelSpec, inputs: PlanInputs) -> dict[str, float]:
    """Per-device activation bytes at the end of forward and the start of backward."""
    tokens = inputs.batch_size * inputs.seq_len
    layer = act.layer_bytes_per_token(spec, inputs) * tokens + act.layer_constant_bytes(spec, inputs)
    in_flight = act.backward_transient_bytes_per_token(spec, inputs) * tokens
    dora = act.dora_transient_bytes(spec, inputs)  # while one layer's forward (or recomputed forward) runs
    logits = act.logits_bytes_per_token(spec, inputs)
    final_norm = act.norm_bytes(spec, inputs, 1) * tokens
    embed_out = act.stream_bytes(inputs) * spec.hidden_size * tokens
    mask = act.attention_mask_bytes(spec, inputs)
    n = spec.num_layers
    if inputs.gradient_checkpointing:
        checkpoint = act.checkpoint_bytes_per_token(spec, inputs) * tokens
        # offloading moves every layer's checkpointed input to host memory; one is brought back per layer
        # in the backward (a second one in flight): what stays is 2 x seq x hidden, not layers x seq x hidden
        kept = (min(n, 2) if inputs.activation_offloading else n) * checkpoint
    else:
        kept = n * layer + embed_out
        if inputs.activation_offloading:
            kept = min(kept, 2 * layer + embed_out)
    kept += final_norm + mask
    # Autocast caches a low-precision copy of every fp32 weight for the whole forward. Sharded runs
    # (FSDP mixed-precision policy, DeepSpeed) already compute with 16-bit parameters: no cache.
    cache = head_copy = 0.0
    if act.fp32_master(inputs) and inputs.shard in ("none", "ddp"):
        head_copy = 2.0 * (spec.params_lm_head or spec.params_embedding)
        cache = 2.0 * spec.params_linear + head_copy
    # the backward keeps the copies its layers saved; the LM head is never checkpointed, so its copy stays saved
    # until its backward with checkpointing too
    saved_copies = head_copy if inputs.gradient_checkpointing else cache
    # the adapters' copies too (without checkpointing: in each layer's saved set); autocast caches casts of fp32
    # leaves only, so 16-bit adapters in the other 16-bit dtype are cast anew at each use and kept by no cache
    if inputs.gradient_checkpointing and inputs.adapter_dtype == "fp32":
        cache += act.adapter_cast_bytes(spec, inputs)
    head_cast = act.head_cast_bytes(spec, inputs)
    return {
        "forward": kept + logits.forward_peak * tokens + head_cast,
        "forward_layer": kept,  # the last layer's forward, before the LM head
        "forward_layer_transient": dora,
        "forward_cache": cache,
        # the loss's gradients are freed before the first checkpointed layer is recomputed
        "backward": kept + max(logits.backward_peak * tokens, in_flight) + head_cast,
        "backward_head_op": kept + head_cast,
        "backward_head_cast": kept,  # the head's matmul has freed its weight's low-precision copy
        "backward_head": kept + in_flight + head_cast,
        "backward_cache": saved_copies,
        "backward_cache_after_head": saved_copies - head_copy,
        # under checkpointing the layer is recomputed in the backward, DoRA's norm temporaries with it
        "layer": layer + (kept + max(in_flight, dora) if inputs.gradient_checkpointing else in_flight),
    }


def accumulated_gradients(full: float, per_device: float, inputs: PlanInputs) -> float:
    """Gradients of earlier micro-batches, alive through the forward and backward of the next ones when
    ``gradient_accumulation_steps`` > 1 (one micro-batch: none exist yet when the forward runs).

    DDP and FSDP under the Trainer's default (``no_sync`` on every micro-batch but the last, accelerate's
    ``sync_each_batch=False``) keep them unsharded: FSDP's ``no_sync`` accumulates unsharded gradients, as its
    documentation warns; DeepSpeed ZeRO accumulates into its gradient partition."""
    if inputs.gradient_accumulation_steps <= 1:
        return 0.0
    if inputs.shard in ("ddp", "fsdp") and inputs.offload == "none":
        return full
    return per_device


def _embedding_grad_temp(spec: ModelSpec, inputs: PlanInputs) -> float:
    """A tied embedding's gradient is made twice: the LM head's part (the first the backward makes) waits in
    autograd's input buffer until the embedding backward builds its dense vocabulary x hidden part, and the two
    are summed out of place before the sum becomes ``.grad``: three gradient-sized tensors at once, two beyond the
    ``.grad`` the plan counts (seen op by op on real tensors: ``mm``, ``embedding_dense_backward``, ``add``). On a
    later micro-batch of an accumulated step the sum is added into a ``.grad`` that is already there: all three
    are extra. This happens last in the backward, once every layer's activations are freed."""
    if not spec.tie_embeddings:
        return 0.0  # the fresh gradient simply becomes .grad; only a tied weight accumulates into lm_head's
    if inputs.is_peft:
        # PEFT's modules_to_save copies of tied embeddings are separate parameters (a deep copy each): the
        # trainable embedding's gradient becomes its .grad directly, and the frozen originals get none
        return 0.0
    return (3 if _adds_into_grad(inputs) else 2) * (4 if inputs.precision != "bf16" else 2) * spec.params_embedding


def _adds_into_grad(inputs: PlanInputs) -> bool:
    """Whether a later micro-batch's fresh gradients are made beside a ``.grad`` already there and then added into
    it (DeepSpeed moves each gradient into its own buffers as it is made, leaving no ``.grad``)."""
    return inputs.gradient_accumulation_steps > 1 and inputs.shard in ("none", "ddp", "fsdp")


_PHASE_NAMES = {"backward_late": "backward", "backward_embedding": "backward", "backward_head": "backward",
                "backward_head_op": "backward", "backward_head_cast": "backward", "forward_layer": "forward"}


def estimate(spec: ModelSpec, inputs: PlanInputs, budget_bytes: int | None = None,
             budget_label: str | None = None, *, slack: bool = True) -> Plan:
    """The analytic plan: per-device peak and its breakdown. Pure arithmetic, no torch.

    ``slack=False`` leaves out the caching allocator's slack (the replay that is most of a plan's time): its
    ``peak_bytes`` is then a lower bound of the real plan's, which is what :func:`suggest` ranks by first."""
    states = model_states(spec, inputs)
    sh = shard_states(states, spec, inputs)
    phases = _activation_phases(spec, inputs)

    # Candidate peaks: end of forward, start of backward, late backward (grads built up), optimizer step.
    fwd_transient = phases["forward_cache"]
    carried = accumulated_gradients(states.gradients, sh.gradients, inputs)
    share = sh.gradients / states.gradients if states.gradients else 1.0
    head_grad_unsharded = head_gradient_bytes(spec, inputs)
    head_grad = head_grad_unsharded * share  # made first in the backward
    logits = act.logits_bytes_per_token(spec, inputs)
    tokens = inputs.batch_size * inputs.seq_len
    # the gradient of the logits, in the compute dtype, which the LM head's backward reads (fused loss: chunks);
    # activation offloading keeps the fp32 log-probs it brought back from host memory until a later node's backward
    grad_logits = 0.0
    if logits.forward_peak:
        per_logit = act.compute_bytes(inputs) + (4 if inputs.activation_offloading else 0)
        grad_logits = float(per_logit * spec.vocab_size * tokens)
    # An fp32 head under autocast makes its gradient in the compute dtype, then casts it to fp32 (once its matmul's
    # backward has freed the logits' gradient and the weight's low-precision copy)
    head_params = spec.params_lm_head or spec.params_embedding
    fp32_head = inputs.autocast and head_params and head_grad_unsharded == 4 * head_params
    low_grad = head_grad * act.compute_bytes(inputs) / 4 if fp32_head else 0.0
    # A later micro-batch makes the head's fresh gradient beside the accumulated ones, then adds it into them; a
    # tied head's part waits in autograd's input buffer for the embedding's part, through the whole backward
    pending = 0.0
    if _adds_into_grad(inputs):
        pending = head_grad if spec.tie_embeddings and not inputs.is_peft else 0.0
        at_matmul, at_head, after_head = carried + (low_grad or head_grad), carried + head_grad, carried + pending
    else:
        at_matmul, at_head = max(carried, low_grad or head_grad), max(carried, head_grad)
        after_head = at_head
    candidates = {
        "forward": (carried, phases["forward"], fwd_transient + sh.gathered),
        "forward_layer": (carried, phases["forward_layer"],
                          fwd_transient + phases["forward_layer_transient"] + sh.gathered),
        "backward": (carried, phases["backward"], phases["backward_cache"] + sh.gathered),
        # the LM head's backward making its gradient from the logits' one, then casting it to fp32
        "backward_head_op": (at_matmul, phases["backward_head_op"] + grad_logits,
                             phases["backward_cache"] + sh.gathered),
        "backward_head_cast": (at_head, phases["backward_head_cast"],
                               low_grad + phases["backward_cache_after_head"] + sh.gathered),
        # once the LM head's backward has run: its gradient, the loss's gradients freed
        "backward_head": (after_head, phases["backward_head"], phases["backward_cache_after_head"] + sh.gathered),
        # the first layer's backward (the embedding's gradient not made yet), then the embedding's own
        "backward_late": (max(sh.gradients, carried) + pending, phases["layer"], sh.gathered),
        "backward_embedding": (max(sh.gradients, carried), 0.0, sh.gathered + _embedding_grad_temp(spec, inputs)),
        "optimizer": (sh.gradients, 0.0, sh.optimizer_step_temp),
    }
    phase, (grads, acts, transient) = max(candidates.items(), key=lambda kv: sum(kv[1]))
    logits_part = 0.0
    if phase == "forward":
        logits_part = logits.forward_peak * tokens
    elif phase == "backward":
        logits_part = logits.backward_peak * tokens
    elif phase == "backward_head_op":
        logits_part = grad_logits
    constants = load("constants")
    breakdown = {
        "weights": sh.weights,
        "adapter_weights": sh.adapter_weights,
        "quant_constants": sh.quant_constants,
        "gradients": grads,
        "optimizer_states": sh.optimizer_states,
        "activations": acts - logits_part,
        "logits_loss": logits_part,
        "transient": transient - (sh.gathered if phase != "optimizer" else 0.0),
        "sharding_buffers": sh.persistent_buffers + (sh.gathered if phase != "optimizer" else 0.0),
        "fragmentation": float(allocator_slack(spec, inputs)) if slack else 0.0,
        "comm_buffers": float(comm_buffer_bytes(inputs)),
        "cuda_context": float(constants["cuda_context_bytes"]),
    }
    rounded = {k: int(round(v)) for k, v in breakdown.items()}
    return Plan(
        model=spec,
        inputs=inputs,
        peak_bytes=sum(rounded.values()),
        allocated_peak_bytes=sum(v for k, v in rounded.items() if k not in FIXED),
        breakdown=rounded,
        peak_phase=_PHASE_NAMES.get(phase, phase),
        trainable_params=states.trainable_params,
        budget_bytes=budget_bytes,
        budget_label=budget_label,
    )
