"""Model states: weights, quantization constants, adapters, gradients and optimizer states (bytes)."""

from __future__ import annotations

from dataclasses import dataclass

from hf_ftkit._data import load
from hf_ftkit.planner.activations import lora_targets, stream_bytes
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.spec import ModelSpec


@dataclass(frozen=True)
class ModelStates:
    """Unsharded per-replica bytes of everything that lives for the whole run."""

    weights: float  # base weights as held on the device (4-bit packed for QLoRA)
    quant_constants: float  # absmax (and double-quant) constants of 4-bit weights
    adapter_weights: float  # LoRA/DoRA parameters and modules_to_save copies
    gradients: float
    optimizer_states: float
    optimizer_step_temp: float  # transient while optimizer.step() runs
    trainable_params: int
    largest_trainable: int


def adapter_params(spec: ModelSpec, inputs: PlanInputs) -> int:
    """LoRA (and DoRA magnitude) parameters for the configured rank and targets."""
    total = 0
    for g in lora_targets(spec, inputs):
        total += g.count * inputs.lora_r * (g.in_features + g.out_features)
        if inputs.dora:
            total += g.count * g.out_features
    return total


def modules_to_save_params(spec: ModelSpec, inputs: PlanInputs) -> int:
    names = set(inputs.modules_to_save)
    total = 0
    if names & {"embed_tokens", "wte", "embeddings"}:
        total += spec.params_embedding
    if names & {"lm_head"}:
        total += spec.params_lm_head or spec.params_embedding
    return total


def saved_module_bytes(inputs: PlanInputs) -> int:
    """Bytes per parameter of PEFT's modules_to_save copies: the copied module's dtype (fp32 on a 4-bit base after
    prepare_model_for_kbit_training)."""
    if inputs.quantized_base:
        return stream_bytes(inputs)
    return inputs.weight_bytes


def head_gradient_bytes(spec: ModelSpec, inputs: PlanInputs) -> float:
    """The LM head's gradient, the first one the backward makes, alive through the rest of it when the head is
    trained: full fine-tuning, or PEFT's modules_to_save copy of it."""
    head = spec.params_lm_head or spec.params_embedding
    if not inputs.is_peft:
        return inputs.weight_bytes * head
    if "lm_head" in inputs.modules_to_save:
        return saved_module_bytes(inputs) * head
    return 0.0


def _optimizer_bytes(
    params: int, param_bytes: float, largest: int, optim: str, spec: ModelSpec
) -> tuple[float, float]:
    """(resident states, step temporaries) for ``params`` trainable parameters holding ``param_bytes`` bytes
    (torch optimizers keep their states in each parameter's dtype)."""
    table = load("optimizers")
    info = table["optimizers"][optim]
    kind = info["state_dtype"]
    if info.get("factored"):
        # Adafactor keeps a row and a column second moment per matrix: ~ (rows + cols) fp32.
        h = spec.hidden_size
        states = 4.0 * params * 2 / max(h, 1)
        # transformers' Adafactor steps one parameter at a time: two fp32 tensors of its size at once (grad ** 2
        # and + eps; the factored estimate and the update it replaces; -update), and for a 16-bit parameter fp32
        # copies of it and of its gradient besides (traced: 2.0x and 4.0x the largest matrix in fp32)
        copies = 2 if param_bytes < 4.0 * params else 0
        return states, (2 + copies) * 4.0 * largest
    if kind == "int8":
        states = info["states"] * (1 + 4 / table["block_size_8bit"]) * params
    elif kind == "fp32":
        states = info["states"] * 4.0 * params
    else:
        states = info["states"] * param_bytes
    temp = 0.0
    if info["step_temp"] == "foreach":
        temp = param_bytes
    elif info["step_temp"] == "per_param":
        temp = 2 * 4.0 * largest
    return states, temp


def model_states(spec: ModelSpec, inputs: PlanInputs) -> ModelStates:
    """Bytes of weights, adapters, grads and optimizer states for one unsharded replica."""
    wb = inputs.weight_bytes
    if not inputs.is_peft:
        trainable = spec.params_total
        matrices = (g.in_features * g.out_features for g in spec.linears)
        largest = max(spec.params_embedding, spec.params_lm_head, *matrices)
        states, temp = _optimizer_bytes(trainable, wb * trainable, largest, inputs.optim, spec)
        return ModelStates(
            weights=wb * spec.params_total, quant_constants=0.0, adapter_weights=0.0,
            gradients=wb * trainable, optimizer_states=states, optimizer_step_temp=temp,
            trainable_params=trainable, largest_trainable=largest,
        )
    adapters = adapter_params(spec, inputs)
    saved_modules = modules_to_save_params(spec, inputs)
    trainable = adapters + saved_modules
    largest = max([saved_modules] + [g.out_features * inputs.lora_r for g in lora_targets(spec, inputs)] + [1])
    # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype) even over a bf16 base, unless adapter_dtype
    # says otherwise; its modules_to_save copies keep the copied module's dtype (fp32 on a 4-bit base after
    # prepare_model_for_kbit_training), and so do their gradients and (torch optimizers) their states.
    saved_bytes = saved_module_bytes(inputs)
    adapter_bytes = inputs.adapter_param_bytes * adapters + saved_bytes * saved_modules
    base_bytes = 4 if inputs.precision == "fp32" else 2
    quant = 0.0
    if inputs.quantized_base:
        quantized = spec.params_quantizable
        other = spec.params_total - quantized
        other_bytes = stream_bytes(inputs)  # fp32 after prepare_model_for_kbit_training
        weights = quantized / 2 + other_bytes * other
        block = load("constants")["nf4_block"]
        blocks = quantized / block
        quant = blocks * (1 + 4 / load("constants")["double_quant_block"]) if inputs.double_quant else blocks * 4
    else:
        weights = base_bytes * spec.params_total
    grads = float(inputs.adapter_param_bytes * adapters + saved_bytes * saved_modules)
    states, temp = _optimizer_bytes(trainable, adapter_bytes, largest, inputs.optim, spec)
    return ModelStates(
        weights=weights, quant_constants=quant, adapter_weights=adapter_bytes, gradients=grads,
        optimizer_states=states, optimizer_step_temp=temp, trainable_params=trainable,
        largest_trainable=largest,
    )
