"""Training FLOPs per token for full fine-tuning, LoRA, DoRA and QLoRA.

The counts follow the usual matmul accounting (Kaplan et al. 2020; Chinchilla's 6·N):

- a forward pass costs ``2·M`` per token, where ``M`` is the parameters that take part in a matmul for
  that token (every decoder linear, the active experts only for MoE, and the LM head; the input
  embedding is a lookup), plus causal attention ``2·L·q·s`` (QKᵀ and AV, each ``2·q`` per key, over ``s/2``
  keys on average);
- full fine-tuning's backward pass costs twice the forward (activation gradients and weight gradients):
  ``6·M`` in all, the "≈ 6·N" rule;
- frozen-base methods skip the weight gradients of the base: ``4·M`` for the base matmuls, while attention
  (which has no weights) still costs three times its forward; the adapters add ``6·P`` for their ``P``
  parameters;
- gradient checkpointing recomputes the forward once more;
- DoRA recomputes the column norm of ``W + s·BA`` for every adapted weight at each forward (PEFT detaches it,
  so it has no backward): ``(2r + 3)`` per weight element, per micro-batch;
- QLoRA dequantizes each 4-bit weight before every matmul that uses it: forward, backward and recompute,
  counted as 2 operations (code-book lookup and block scale) per weight element, per micro-batch.

The per-micro-batch terms are divided by the tokens in one micro-batch to give a per-token figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_ftkit.planner.activations import lora_targets
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.spec import ModelSpec
from hf_ftkit.planner.states import adapter_params

DEQUANT_OPS_PER_WEIGHT = 2  # NF4 code-book lookup + multiply by the block's absmax


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token, by where they go (floating-point operations, not FLOP/s)."""

    base_matmul: float  # forward + backward matmuls of the base weights
    attention: float  # QKᵀ and AV, forward and backward
    adapter: float  # LoRA A/B matmuls, forward and backward (0 for full FT)
    recompute: float  # gradient checkpointing's second forward
    dora_norm: float  # DoRA weight-norm recomputation, per token
    dequant: float  # QLoRA dequantization, per token

    @property
    def total(self) -> float:
        return self.base_matmul + self.attention + self.adapter + self.recompute + self.dora_norm + self.dequant


def matmul_params(spec: ModelSpec) -> float:
    """Parameters used in a matmul for one token: decoder linears, active experts and the LM head."""
    lm_head = spec.params_lm_head or spec.params_embedding  # a tied head multiplies by the embedding
    linears = spec.params_linear
    # What the decoder holds beyond its attention/MLP linears: experts (and the router) for MoE, norms otherwise.
    rest = 0.0  # dense models: only norm weights remain, and they are elementwise, not matmuls
    if spec.is_moe:
        experts = spec.params_total - spec.params_embedding - spec.params_lm_head - linears
        rest = experts * spec.experts_per_token / spec.num_experts
    return float(linears + rest + lm_head)


def attention_forward(spec: ModelSpec, seq_len: int) -> float:
    """Causal attention's forward FLOPs per token: 2·L·q_dim·s (keys attended average s/2, within the window)."""
    keys = seq_len if not spec.sliding_window else min(seq_len, 2 * spec.sliding_window)
    return 2.0 * spec.num_layers * spec.q_dim * keys


def flops_per_token(spec: ModelSpec, inputs: PlanInputs) -> FlopsPerToken:
    """Training FLOPs per token for ``inputs.method`` with ``inputs``' sequence length and micro-batch."""
    m = matmul_params(spec)
    attn = attention_forward(spec, inputs.seq_len)
    ckpt = inputs.gradient_checkpointing
    micro_batch_tokens = inputs.batch_size * inputs.seq_len
    if not inputs.is_peft:
        return FlopsPerToken(base_matmul=6 * m, attention=3 * attn, adapter=0.0,
                             recompute=(2 * m + attn) if ckpt else 0.0, dora_norm=0.0, dequant=0.0)
    adapters = adapter_params(spec, inputs)
    if inputs.dora:
        adapters -= sum(g.count * g.out_features for g in lora_targets(spec, inputs))  # magnitudes: elementwise
    forwards = 2 if ckpt else 1
    dora = 0.0
    if inputs.dora:
        adapted = sum(g.count * g.in_features * g.out_features for g in lora_targets(spec, inputs))
        dora = forwards * (2 * inputs.lora_r + 3) * adapted / micro_batch_tokens
    dequant = 0.0
    if inputs.quantized_base:
        dequant = (forwards + 1) * DEQUANT_OPS_PER_WEIGHT * spec.params_quantizable / micro_batch_tokens
    return FlopsPerToken(base_matmul=4 * m, attention=3 * attn, adapter=6.0 * adapters,
                         recompute=(2 * m + attn + 2 * adapters) if ckpt else 0.0, dora_norm=dora, dequant=dequant)
