"""Activation memory: what autograd keeps alive between forward and backward, per token.

Each term mirrors a tensor the real modules save (checked against ``saved_tensors_hooks`` dumps
and ``--exact`` traces): RMSNorm keeps its fp32 upcast and rstd; SDPA/flash attention keeps q, k,
v, the output and the log-sum-exp; a gated MLP keeps gate, up, act(gate) and their product; the
loss keeps fp32 log-probabilities over the vocabulary. A frozen linear keeps nothing for its own
weight, which is why LoRA saves less than full fine-tuning in the same dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.spec import LinearGroup, ModelSpec


def compute_bytes(inputs: PlanInputs) -> int:
    """Bytes per element of activations (autocast dtype, or fp32)."""
    return 4 if inputs.compute_dtype_name == "fp32" else 2


def adapter_bytes(inputs: PlanInputs) -> int:
    """Bytes per element of what a LoRA branch computes on: the compute dtype under autocast; without it, the
    adapter's own dtype (PEFT casts each target's input to it: fp32 by default, ``autocast_adapter_dtype``)."""
    return compute_bytes(inputs) if inputs.autocast else inputs.adapter_param_bytes


def _stream_dtype(inputs: PlanInputs) -> str:
    return "fp32" if stream_bytes(inputs) == 4 else inputs.compute_dtype_name


def adapter_input_copied(inputs: PlanInputs) -> bool:
    """lora_A keeps a tensor of its own for each target: dropout's output, PEFT's cast of the input to the adapter
    dtype, or autocast's cast of that to the compute dtype. Only adapters in the stream's own dtype without dropout
    keep the input itself, which the targets reading one norm's output (q, k, v) then share (the frozen base
    linear keeps none)."""
    same = inputs.adapter_dtype == _stream_dtype(inputs)
    cast = inputs.autocast and inputs.adapter_dtype != inputs.compute_dtype_name
    return inputs.lora_dropout > 0 or not same or cast


def stream_bytes(inputs: PlanInputs) -> int:
    """Bytes per element of the residual stream and of what stays in its dtype: norm outputs, a 4-bit linear's
    output (bitsandbytes returns it in its input's dtype) and the MLP intermediates built from them.

    prepare_model_for_kbit_training upcasts the embeddings and norms of a quantized base to fp32, so the stream
    is fp32 although autocast still runs the attention and the adapters in the compute dtype."""
    return 4 if inputs.kbit_upcast and inputs.quantized_base else compute_bytes(inputs)


def head_cast_bytes(spec: ModelSpec, inputs: PlanInputs) -> int:
    """An fp32 LM head (upcast by prepare_model_for_kbit_training) runs under autocast through a low-precision
    copy of its weight, which the linear keeps for the gradient of its input until the backward reaches it."""
    if stream_bytes(inputs) == compute_bytes(inputs):
        return 0
    return compute_bytes(inputs) * (spec.params_lm_head or spec.params_embedding)


def fp32_master(inputs: PlanInputs) -> bool:
    """Full fine-tuning with fp32 weights under autocast (bf16-/fp16-mixed)."""
    return not inputs.is_peft and inputs.precision.endswith("-mixed")


def is_gated(spec: ModelSpec) -> bool:
    names = set(spec.linear_names())
    return bool(names & {"gate_proj", "w1", "gate_up_proj"}) or spec.is_moe


# Linears fed by something other than a norm's output (attention output, MLP product). The rest of a
# layer's linears read a norm's output; under autocast each of them keeps its own low-precision cast.
_SECOND_LINEARS = frozenset({"o_proj", "down_proj", "out_proj", "dense", "w2", "fc2", "c_proj", "dense_4h_to_h", "wo"})


# Linears reading the attention's output (the names other projections share are left out)
_ATTENTION_OUTPUTS = frozenset({"o_proj", "out_proj"})


# Linears reading the attention's input norm (the rest of the norm-fed ones read the MLP's).
_ATTENTION_INPUTS = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack",
                               "query", "key", "value", "q_a_proj", "kv_a_proj_with_mqa"})


def norm_fed_linears_per_layer(spec: ModelSpec) -> int:
    """Decoder linears per layer that read a norm output (q/k/v/gate/up or fused forms)."""
    per_layer = sum(g.count for g in spec.linears if g.name not in _SECOND_LINEARS) / max(spec.num_layers, 1)
    return max(int(round(per_layer)), 2)


def lora_targets(spec: ModelSpec, inputs: PlanInputs) -> list[LinearGroup]:
    """Decoder linears a LoRA config wraps (``all-linear`` = every decoder linear)."""
    if not inputs.is_peft:
        return []
    names = inputs.target_names()
    if names is None:
        return list(spec.linears)
    return [g for g in spec.linears if g.name in names]


def norm_bytes(spec: ModelSpec, inputs: PlanInputs, fed_linears: int) -> float:
    """One of the model's RMSNorms/LayerNorms over its hidden features that feeds ``fed_linears`` linears, per
    token. Where the norm multiplies its weight into the fp32 normalized value (Gemma, OLMo 2:
    ``ModelSpec.norm_scales_in_fp32``) full fine-tuning keeps that fp32 value for the weight's gradient."""
    h, fp32_scale = spec.hidden_size, spec.norm_scales_in_fp32
    c = compute_bytes(inputs)
    saved: float = 4.0 * h + 4  # fp32 upcast (kept by pow/mul) + rstd
    if inputs.use_liger_kernel:
        saved = c * h + 4  # Liger's kernel keeps the input in its dtype and rstd
    if not inputs.is_peft:
        master = fp32_master(inputs)
        # the normalized value, for the norm weight's gradient
        saved += (4 if (master or c == 4 or (fp32_scale and not inputs.use_liger_kernel)) else c) * h
        if fed_linears:
            # the input the linears keep for their weight grads; autocast makes one cast per linear
            saved += (fed_linears * 2 * h) if master else c * h
    return saved


def effective_attention(spec: ModelSpec, inputs: PlanInputs) -> str:
    """The attention implementation transformers will really use for this model."""
    impl = inputs.attn_implementation
    if impl == "sdpa" and not spec.supports_sdpa:
        return "eager"
    if impl == "flash_attention_2" and not spec.supports_flash_attn:
        return "sdpa" if spec.supports_sdpa else "eager"
    return impl


def cast_bytes(to: int, source: int) -> int:
    """Bytes per element a cast keeps: none where it is to the dtype the tensor has (``.to`` returns the tensor).
    Only fp32 has 4 bytes among the dtypes planned, so the sizes tell the dtypes apart."""
    return 0 if to == source else to


def _attention_bytes(spec: ModelSpec, inputs: PlanInputs) -> float:
    c = compute_bytes(inputs)
    q, kv, heads = spec.q_dim, spec.kv_dim, spec.num_heads
    impl = effective_attention(spec, inputs)
    if impl == "eager":
        # The two matmuls keep q, and k and v as they read them: repeated to the query heads (a single head's
        # expanded view is copied by the matmul), never the unrepeated k and v. The softmax keeps its fp32 output
        # and the matmul with v its cast to the compute dtype; the product with v is not kept: only a trained
        # o_proj keeps the attention output, as its input (PEFT's branches keep their own copies: _lora_bytes).
        saved: float = 3 * c * q + (4 + cast_bytes(c, 4)) * heads * attention_span(inputs)
        saved += 0 if inputs.is_peft else c * q
        if spec.attn_logit_softcapping:  # Gemma 2's tanh(scores / cap) keeps its output, alive through the softmax
            saved += c * heads * attention_span(inputs)
    else:
        # rotated q, k and v, the output and the log-sum-exp
        saved = c * q + 2 * c * kv + c * q + 4 * heads
        # With a mask transformers repeats k and v before SDPA (SDPA's own GQA is used only without one), and SDPA
        # converts the boolean mask to the query dtype on every call; its kernel keeps that copy for the backward:
        # (B, 1, S, S) per layer, S elements per token. transformers' repeat_kv copies k and v to the query heads,
        # except one kv head, which it expands in a view.
        repeated = kv if spec.num_kv_heads == 1 else q
        saved += sdpa_masked_share(spec, inputs) * (c * attention_span(inputs) + 2 * c * (repeated - kv))
    if spec.qk_norm:
        saved += 4.0 * (q + kv) + 4 * (heads + spec.num_kv_heads)
        if not inputs.is_peft:  # the normalized value, in fp32 where the norm scales it in fp32
            saved += (4 if spec.norm_scales_in_fp32 else c) * (q + kv)
    return saved


def _mlp_bytes(spec: ModelSpec, inputs: PlanInputs) -> float:
    c = compute_bytes(inputs)
    full = not inputs.is_peft
    if spec.is_moe:
        e, k, hi = spec.num_experts, spec.experts_per_token, spec.moe_intermediate_size
        router = 4 * e * 2  # fp32 router logits and softmax
        per_expert_token = (4 if full else 3) * c * hi + 2 * c * spec.hidden_size
        shared = (4 if full else 3) * c * spec.shared_expert_intermediate_size
        return router + k * per_expert_token + shared
    i = spec.intermediate_size
    s = stream_bytes(inputs)
    if is_gated(spec):
        tensors = 2 if inputs.use_liger_kernel else (4 if full else 3)
        return tensors * s * i
    return (2 if full else 1) * s * i


def _lora_bytes(spec: ModelSpec, inputs: PlanInputs, attention_inputs: bool | None = None) -> float:
    """What the adapter branches keep per layer: their (dropout) input and the rank-r projection; with
    ``attention_inputs``, only those of the targets that do (True) or do not (False) read the attention's input."""
    c, b = compute_bytes(inputs), adapter_bytes(inputs)
    copied = adapter_input_copied(inputs)
    targets = [g for g in lora_targets(spec, inputs)
               if attention_inputs is None or (g.name in _ATTENTION_INPUTS) == attention_inputs]
    saved = 0.0
    # SDPA and flash attention keep their output, which o_proj reads through a view: an adapter reading it as it is
    # keeps the same tensor (eager attention keeps no output: _attention_bytes)
    kernel_output = effective_attention(spec, inputs) != "eager"
    for g in targets:
        per_layer = g.count / spec.num_layers
        # PEFT casts the input to the adapter dtype per target; lora_A keeps that copy (after dropout; under
        # autocast its low-precision cast), dropout keeps a one-byte mask
        own_input = copied or (g.name in _SECOND_LINEARS and not (kernel_output and g.name in _ATTENTION_OUTPUTS))
        per_target = b * g.in_features if own_input else 0
        per_target += g.in_features if inputs.lora_dropout > 0 else 0
        per_target += b * inputs.lora_r  # lora_A output, kept by lora_B
        if inputs.dora:
            # the base output (with dropout, DoRA's own product in the adapter dtype; without, the base layer's, which
            # a 4-bit layer returns in its input's dtype: fp32 after the upcast) and the branch's result, both kept by
            # the magnitude's multiplications
            base = stream_bytes(inputs) if inputs.quantized_base and g.quantizable else c
            per_target += ((b if inputs.lora_dropout > 0 else base) + b) * g.out_features
        saved += per_layer * per_target
    if not copied:  # one shared input per norm read: the attention's, the MLP's
        fed = [g for g in targets if g.name not in _SECOND_LINEARS]
        sides = {g.name in _ATTENTION_INPUTS for g in fed}
        saved += sum(max(g.in_features for g in fed if (g.name in _ATTENTION_INPUTS) == side) for side in sides) * b
    return saved


def _dora_copies_weight(inputs: PlanInputs) -> bool:
    """DoRA reads its base weight through a fresh copy in the adapter's dtype (PEFT's ``weight.to(x.dtype)``, where
    ``x`` was cast to the adapter's dtype): none is made only where the base is an unquantized weight already in it."""
    return inputs.quantized_base or inputs.weight_dtype != inputs.adapter_dtype


def _dora_keeps_weight(inputs: PlanInputs) -> bool:
    """With ``lora_dropout`` > 0 DoRA computes the base output itself (``F.linear(x, weight)``), which keeps a
    weight-sized tensor that is not the parameter: the fresh copy, or autocast's cast of the weight to the compute
    dtype. A 16-bit weight read by adapters of its own dtype in that same dtype keeps the parameter itself."""
    cast = inputs.autocast and inputs.adapter_dtype != inputs.compute_dtype_name
    return inputs.dora and inputs.lora_dropout > 0 and (cast or _dora_copies_weight(inputs))


def adapter_cast_bytes(spec: ModelSpec, inputs: PlanInputs) -> float:
    """Autocast's low-precision copies of every adapter weight not in the compute dtype (PEFT's fp32 A and B), in
    all layers: autocast casts each once per forward and holds the copy in its cache until the forward returns (the
    loss included), with or without checkpointing; without it the backward keeps them as well."""
    if not (inputs.autocast and inputs.adapter_dtype != inputs.compute_dtype_name):
        return 0.0
    return float(sum(compute_bytes(inputs) * inputs.lora_r * (g.in_features + g.out_features) * g.count
                     for g in lora_targets(spec, inputs)))


def layer_constant_bytes(spec: ModelSpec, inputs: PlanInputs) -> float:
    """Token-independent activations per layer.

    Under autocast every adapter weight not in the compute dtype (PEFT's fp32) is used through a cached
    low-precision copy that the backward keeps. DoRA with ``lora_dropout`` > 0 computes the base output itself,
    from its copy of the weight in the adapter dtype, and ``F.linear`` keeps the weight it multiplied by (the
    autocast cast, or the copy itself without autocast) for its input's gradient: one weight-sized tensor per
    target, unless that is the 16-bit parameter itself (``_dora_keeps_weight``). Without dropout PEFT reuses the
    base layer's output and keeps nothing weight-sized (both measured on real tensors: docs/planner.md).
    """
    targets = lora_targets(spec, inputs)
    if not targets:
        return 0.0
    b = adapter_bytes(inputs)
    total = adapter_cast_bytes(spec, inputs)
    if _dora_keeps_weight(inputs):
        total += sum(b * g.in_features * g.out_features * g.count for g in targets)
    return total / spec.num_layers


def dora_transient_bytes(spec: ModelSpec, inputs: PlanInputs) -> float:
    """The largest of DoRA's weight-norm temporaries, alive while one target's forward runs (also in the
    recomputed forward under gradient checkpointing).

    PEFT's ``DoraLinearLayer`` builds ``lora_B @ lora_A`` by passing an in x in identity through both (lora_A's
    graph keeps the identity's low-precision cast until the forward returns), casts that product to the input's
    dtype (the adapter's), copies the base weight to it (unless it is already a weight of that dtype), and adds
    the scaled product to it before taking the row norms: about 2 in² + 18 in·out bytes at once for fp32 adapters
    under bf16 autocast, on the widest target. Before that, the identity and its cast are alive together with the
    product.
    """
    if not inputs.dora:
        return 0.0
    c, a = adapter_bytes(inputs), inputs.adapter_param_bytes  # PEFT casts each target's input to the adapter dtype
    base = a if _dora_copies_weight(inputs) else 0
    peak = 0.0
    for g in lora_targets(spec, inputs):
        square, product = g.in_features * g.in_features, g.in_features * g.out_features
        identity = c * square
        building = identity + (a * square if c != a else 0) + c * product
        norm = identity + (c + (a if c != a else 0) + base + 2 * a) * product  # + scaled product and the sum
        peak = max(peak, building, norm)
    return float(peak)


def layer_bytes_per_token(spec: ModelSpec, inputs: PlanInputs) -> float:
    """Activations one decoder layer keeps per token without checkpointing."""
    fed = norm_fed_linears_per_layer(spec)
    attn_fed = fed - fed // 2  # q,k,v (3 of 5) or fused qkv (1 of 2)
    total = norm_bytes(spec, inputs, attn_fed) + _attention_bytes(spec, inputs)
    total += _lora_bytes(spec, inputs, attention_inputs=True)
    return total + _after_attention_bytes(spec, inputs)


def _after_attention_bytes(spec: ModelSpec, inputs: PlanInputs) -> float:
    """What a layer keeps per token after its attention: the MLP's norm (with the rest of the norm-fed linears' input
    casts), any further norms, the MLP and the adapters not reading the attention's input."""
    total = norm_bytes(spec, inputs, norm_fed_linears_per_layer(spec) // 2)
    total += max(spec.norms_per_layer - 2, 0) * norm_bytes(spec, inputs, 0)
    return total + _mlp_bytes(spec, inputs) + _lora_bytes(spec, inputs, attention_inputs=False)


def backward_transient_bytes_per_token(spec: ModelSpec, inputs: PlanInputs) -> float:
    """Gradients in flight inside one layer's backward, on top of what the layer saved, per token.

    The MLP's backward holds the gradients of its intermediates at once (of the product, of act(gate),
    of up and of gate: four tensors for a gated MLP, two otherwise). An adapted linear adds its branch's
    input-gradient chain, widest on a linear that reads the intermediate (down_proj): the base path's
    gradient, the branch's gradient in the compute dtype, its fp32 copy through PEFT's input cast and
    the dropout's gradient (measured against traced steps of 70B-shaped layers: tests/planner).
    Full fine-tuning: none on top; its saved-set terms already meet or exceed traced steps with the
    gradients in flight (they keep more per layer, and the weight gradients are counted as gradients).
    Eager attention's softmax backward, with either method, where it holds more than these.
    """
    eager = _eager_backward_bytes_per_token(spec, inputs)
    if not inputs.is_peft:
        return eager
    c = compute_bytes(inputs)
    if spec.is_moe:
        wide = spec.experts_per_token * spec.moe_intermediate_size + spec.shared_expert_intermediate_size
    else:
        wide = spec.intermediate_size
    transient = (4 if is_gated(spec) else 2) * stream_bytes(inputs) * wide
    a = 4  # PEFT keeps adapters in fp32 (autocast_adapter_dtype)
    cast = a if a != c else 0
    drop = 1 if inputs.lora_dropout > 0 else 0
    for g in lora_targets(spec, inputs):
        transient = max(transient, (3 * c + cast + drop * a) * g.in_features)
    return float(max(transient, eager))


def _eager_backward_bytes_per_token(spec: ModelSpec, inputs: PlanInputs) -> float:
    """Eager attention's backward, beyond what its layer saved: the softmax's backward holds its fp32 output, the
    incoming gradient cast to fp32 and its own fp32 result at once, 12 bytes per head and key position, against the
    output and its cast to the compute dtype counted as saved. By then the backward has freed the cast and all the
    layer saved after the softmax: v, the attention output, the MLP's norm, the MLP and the adapters reading them.
    At long sequences no other moment of a layer's backward holds as much (traced: tests/planner/test_trace.py)."""
    if effective_attention(spec, inputs) != "eager":
        return 0.0
    c = compute_bytes(inputs)
    # repeated v (and a trained o_proj's input), then all the layer keeps after its attention
    later = c * spec.q_dim * (1 if inputs.is_peft else 2) + _after_attention_bytes(spec, inputs)
    saved = 4 + cast_bytes(c, 4)
    return max(float((12 - saved) * spec.num_heads * attention_span(inputs) - later), 0.0)


@dataclass(frozen=True)
class LogitsBytes:
    """Per-token bytes of the vocabulary-sized tensors of the LM head and the loss."""

    forward_peak: float  # logits + fp32 upcast + log-probs while the loss is computed
    saved: float  # kept after forward (fp32 log-probs)
    backward_peak: float  # saved + gradients flowing back at the start of backward


def logits_bytes_per_token(spec: ModelSpec, inputs: PlanInputs) -> LogitsBytes:
    v = spec.vocab_size
    if inputs.use_liger_kernel:
        # fused linear cross-entropy never materialises full logits: only chunks of them
        return LogitsBytes(forward_peak=0.0, saved=0.0, backward_peak=0.0)
    c = compute_bytes(inputs)
    softcap = c * v if spec.final_logit_softcapping else 0.0  # tanh output kept for its backward
    upcast = 4 * v if c != 4 else 0.0
    forward_peak = c * v + upcast + 4 * v + softcap
    saved = 4 * v + softcap
    return LogitsBytes(forward_peak=forward_peak, saved=saved, backward_peak=saved + 8 * v)


def checkpoint_bytes_per_token(spec: ModelSpec, inputs: PlanInputs) -> float:
    """What a checkpointed layer keeps: its input hidden state."""
    return (4 if fp32_master(inputs) else stream_bytes(inputs)) * spec.hidden_size


def padded_batch(inputs: PlanInputs) -> bool:
    """Whether the plan holds a padding mask: a batch of several unpacked sequences is planned as padded (the
    longest sequence of a batch is not known in advance, so the plan leans to the larger case); flash attention
    takes no mask."""
    if inputs.batch_size == 1 or inputs.packing or inputs.padding_free:
        return False
    return inputs.attn_implementation != "flash_attention_2"


def flattened_batch(inputs: PlanInputs) -> bool:
    """Whether a micro-batch's sequences run as one row: TRL's padding-free batches, which its default packing (BFD)
    uses too, concatenate them and restart the position ids at each sequence."""
    return inputs.packing or inputs.padding_free


def attention_span(inputs: PlanInputs) -> int:
    """The key positions of a query's row: the sequence, or the whole micro-batch in a padding-free row."""
    return inputs.batch_size * inputs.seq_len if flattened_batch(inputs) else inputs.seq_len


def packed_row(inputs: PlanInputs) -> bool:
    """Whether a padding-free row holds several sequences: transformers reads their restarting position ids and, for
    SDPA and eager attention, builds a mask that keeps them apart (flash attention takes their boundaries instead)."""
    if inputs.attn_implementation == "flash_attention_2":
        return False
    return inputs.packing or (inputs.padding_free and inputs.batch_size > 1)


def masked_batch(inputs: PlanInputs) -> bool:
    """Whether every attention layer gets a mask for SDPA: a padded batch, or a packed row."""
    return padded_batch(inputs) or packed_row(inputs)


def sdpa_masked_share(spec: ModelSpec, inputs: PlanInputs) -> float:
    """The share of decoder layers whose SDPA call gets a mask: every layer of a padded batch, else the layers whose
    sliding window is not longer than the sequence (transformers hands SDPA ``is_causal`` instead of a sliding
    mask only while the sequence is shorter than the window; a padding-free row of one sequence gets it too)."""
    if effective_attention(spec, inputs) != "sdpa":
        return 0.0
    if masked_batch(inputs):
        return 1.0
    if not spec.sliding_window or attention_span(inputs) < int(spec.sliding_window):
        return 0.0
    return spec.sliding_layers / spec.num_layers


def attention_mask_bytes(spec: ModelSpec, inputs: PlanInputs) -> float:
    """The masks the model builds once for all its layers, (B, 1, S, S) or a padding-free row's (1, 1, B·S, B·S),
    where they outlive the forward: one per kind of attention layer the model holds (full, sliding window), as
    transformers builds one for each.

    SDPA gets boolean masks: a padded batch's or a packed row's, and a sliding window's wherever the sequence is not
    shorter than the window (transformers cannot hand SDPA ``is_causal`` for it). Eager attention gets additive masks
    in the compute dtype for every batch. Checkpointing keeps them all (each checkpointed layer holds its inputs);
    without it only a padded batch's SDPA mask outlives the forward (a packed row's does not: traced)."""
    square = float(inputs.batch_size) * inputs.seq_len * attention_span(inputs)
    sliding = bool(spec.sliding_window) and spec.sliding_layers > 0
    kinds = int(sliding) + int(spec.num_layers > (spec.sliding_layers if sliding else 0))
    impl = effective_attention(spec, inputs)
    if impl == "eager":
        return compute_bytes(inputs) * square * kinds if inputs.gradient_checkpointing else 0.0
    if impl != "sdpa":
        return 0.0
    if not inputs.gradient_checkpointing:
        return square if padded_batch(inputs) else 0.0
    if masked_batch(inputs):
        return square * kinds
    return square if sliding and attention_span(inputs) >= int(spec.sliding_window or 0) else 0.0
