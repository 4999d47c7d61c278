"""The reserved peak: the allocated plan's tensors, one by one, through the caching-allocator model.

The analytic plan knows how many bytes each phase holds, not how they are cut into tensors; the
allocator's slack depends on the cut. This module cuts them the way a training step does (one
tensor per weight, per gradient and per optimizer state; per layer the saved activations as
intermediate-sized and hidden-sized tensors; vocabulary-sized logits and loss tensors), replays
two optimizer steps through :mod:`hf_ftkit.planner.allocator`, and takes the slack the replay
shows (reserved minus requested bytes at their peaks). The reserved peak is the analytic allocated
peak plus that slack.

When the batch length is not fixed (no packing), the first replayed step is half as long: blocks
cached for shorter batches rarely fit a longer one, which is what makes a long batch late in an
epoch reserve more than the same batch at step one. This leans to over-predicting, on purpose.
"""

from __future__ import annotations

from itertools import count

from hf_ftkit._data import load
from hf_ftkit.planner import activations as act
from hf_ftkit.planner.allocator import CachingAllocator
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.spec import ModelSpec

_cache: dict[tuple[object, ...], int] = {}
_MAX_PIECES = 32


def _tensors(spec: ModelSpec, inputs: PlanInputs) -> tuple[list[list[int]], list[int], list[int]]:
    """Per-layer trainable parameter counts per tensor, frozen base tensors' bytes, other trainables."""
    n = spec.num_layers
    per_layer: list[list[int]] = [[] for _ in range(n)]
    frozen: list[int] = []
    extra: list[int] = []
    peft = inputs.is_peft
    unquantized = act.stream_bytes(inputs)  # fp32 after prepare_model_for_kbit_training
    targets = {g.name for g in act.lora_targets(spec, inputs)}
    for g in spec.linears:
        numel = g.in_features * g.out_features
        for i in range(g.count):
            layer = per_layer[i * n // g.count]
            if not peft:
                layer.append(numel)
                continue
            quantized = inputs.quantized_base and g.quantizable
            frozen.append(numel // 2 if quantized else unquantized * numel)
            if quantized:
                frozen.append(max(numel // load("constants")["nf4_block"], 1))
            if g.name in targets:
                layer.extend((inputs.lora_r * g.in_features, inputs.lora_r * g.out_features))
                if inputs.dora:
                    layer.append(g.out_features)
    rest = spec.params_total - spec.params_linear - spec.params_embedding - spec.params_lm_head
    for layer in per_layer:
        norms = spec.norms_per_layer * spec.hidden_size
        other = [spec.hidden_size] * spec.norms_per_layer + [max(rest // n - norms, 0)]
        if peft:
            frozen.extend(unquantized * p for p in other if p)
        else:
            layer.extend(p for p in other if p)
    for head in (spec.params_embedding, spec.params_lm_head):
        if head and not peft:
            extra.append(head)
        elif head:
            frozen.append(unquantized * head)
    saved = set(inputs.modules_to_save)
    if peft and saved & {"embed_tokens", "wte", "embeddings"}:
        extra.append(spec.params_embedding)
    if peft and "lm_head" in saved:
        extra.append(spec.params_lm_head or spec.params_embedding)
    return per_layer, frozen, extra


class _Step:
    """Replays a run's allocations through the caching-allocator model as it builds them, one device's view."""

    def __init__(self, spec: ModelSpec, inputs: PlanInputs) -> None:
        self.spec, self.inputs = spec, inputs
        self.ids = count()
        self.allocator = CachingAllocator()
        self._malloc, self._free = self.allocator.malloc, self.allocator.free
        self.shards = 1
        if inputs.shard in ("zero3", "fsdp") and inputs.fsdp_strategy != "shard_grad_op":
            self.shards = inputs.gpus if inputs.fsdp_strategy == "hybrid_shard" else inputs.world_size
        self.param_bytes = inputs.weight_bytes
        self.grad_bytes = self.param_bytes if not inputs.is_peft else inputs.adapter_param_bytes
        self.per_layer, self.frozen, self.extra = _tensors(spec, inputs)
        self.dora = act.dora_transient_bytes(spec, inputs)  # per layer's forward; the same every time
        self.grads: list[int] = []
        self.states_made = False
        self._layer_sizes: dict[int, list[float]] = {}

    def alloc(self, nbytes: float) -> int:
        key = next(self.ids)
        self._malloc(key, int(nbytes) if nbytes >= 1 else 1)
        return key

    def free(self, key: int) -> None:
        self._free(key)

    def free_all(self, keys: list[int]) -> None:
        free = self._free
        for key in keys:
            free(key)
        keys.clear()

    def load_model(self) -> None:
        on_device = 0.0 if self.inputs.offload == "params" else 1.0 / self.shards
        adapter_bytes = self.inputs.adapter_param_bytes if self.inputs.is_peft else self.param_bytes
        extra_bytes = self.param_bytes if not self.inputs.is_peft else (4 if self.inputs.precision == "fp32" else 2)
        sizes = [*self.frozen, *(p * adapter_bytes for layer in self.per_layer for p in layer),
                 *(p * extra_bytes for p in self.extra)]
        for nbytes in sizes:
            self.alloc(nbytes * on_device)

    def layer_activations(self, tokens: int) -> list[int]:
        """The saved tensors of one layer: MLP intermediates, then hidden-sized pieces."""
        sizes = self._layer_sizes.get(tokens)
        if sizes is None:
            sizes = self._layer_sizes[tokens] = self._cut_layer(tokens)
        return [self.alloc(s) for s in sizes]

    def _cut_layer(self, tokens: int) -> list[float]:
        spec, inputs = self.spec, self.inputs
        c = act.stream_bytes(inputs)
        total = act.layer_bytes_per_token(spec, inputs) * tokens + act.layer_constant_bytes(spec, inputs)
        sizes: list[float] = []
        if not spec.is_moe:
            inter = c * tokens * spec.intermediate_size
            full = not inputs.is_peft
            wanted = (4 if full else 3) if act.is_gated(spec) else (2 if full else 1)
            while len(sizes) < wanted and total >= inter:
                sizes.append(inter)
                total -= inter
        # the rest in hidden-sized pieces (norm casts, q/k/v, attention output, residuals); where that would
        # take more than _MAX_PIECES (eager attention's seq x seq scores), in _MAX_PIECES equal ones
        pieces = min(max(-(-int(total) // max(int(c * tokens * spec.hidden_size), 1)), 1), _MAX_PIECES)
        sizes.extend([total / pieces] * pieces)
        return [s for s in sizes if s > 0]

    def micro_batch(self, tokens: int, seq: int, first: bool) -> None:
        spec, inputs = self.spec, self.inputs
        c = act.compute_bytes(inputs)
        gc = inputs.gradient_checkpointing
        hidden = act.stream_bytes(inputs) * tokens * spec.hidden_size
        mask = [self.alloc(act.attention_mask_bytes(spec, inputs.replace(seq_len=seq)))]
        gathered_bytes = c * spec.params_largest_layer if self.shards > 1 else 0.0
        saved: list[list[int]] = []
        h = [self.alloc(hidden)]
        for _ in range(spec.num_layers):
            unit = [self.alloc(gathered_bytes)] if gathered_bytes else []
            if gc:
                saved.append([self.alloc(act.checkpoint_bytes_per_token(spec, inputs) * tokens)])
            else:
                saved.append(self.layer_activations(tokens))
            self.dora_norm()
            if inputs.activation_offloading and len(saved) > 2:
                self.free_all(saved[-3])  # copied to host memory; brought back in the backward
            self.free_all(unit)
        self.loss(tokens)
        # a tied embedding's gradient: the LM head's part waits in autograd's input buffer through the backward
        tied = spec.tie_embeddings and not inputs.is_peft and bool(self.extra)
        head_part = [self.alloc(self.extra[0] * self.grad_bytes / self.shards)] if tied else []
        grad_h = [self.alloc(hidden)]
        for index in reversed(range(spec.num_layers)):
            unit = [self.alloc(gathered_bytes)] if gathered_bytes else []
            if not saved[-1]:  # offloaded: the copy comes back before the layer's backward
                saved[-1] = ([self.alloc(act.checkpoint_bytes_per_token(spec, inputs) * tokens)] if gc
                             else self.layer_activations(tokens))
            recomputed = self.layer_activations(tokens) if gc else []
            if gc:
                self.dora_norm()
            fresh = [self.alloc(p * self.grad_bytes / (self.shards if inputs.is_peft else 1))
                     for p in self.per_layer[index]]
            if not inputs.is_peft and self.shards > 1:
                fresh = self._reduce_scatter(fresh, index)
            step = [self.alloc(hidden)]
            self.free_all(grad_h)
            grad_h = step
            if first:
                self.grads.extend(fresh)
            else:
                self.free_all(fresh)
            self.free_all(recomputed)
            self.free_all(saved.pop())
            self.free_all(unit)
        self.free_all(grad_h)
        head = [self.alloc(p * self.grad_bytes / self.shards) for p in self.extra]
        if head_part:  # the embedding's own part was made first (head[0]); their sum out of place becomes .grad
            total = self.alloc(self.extra[0] * self.grad_bytes / self.shards)
            self.free(head[0])
            head[0] = total
            self.free_all(head_part)
        if first:
            self.grads.extend(head)
        else:
            self.free_all(head)
        self.free_all(h)
        self.free_all(mask)

    def dora_norm(self) -> None:
        """DoRA's weight-norm temporaries, made and freed inside a layer's forward."""
        if self.dora:
            self._free(self.alloc(self.dora))

    def loss(self, tokens: int) -> None:
        """The vocabulary-sized tensors, in the order a traced step makes and frees them."""
        spec, inputs = self.spec, self.inputs
        if not act.logits_bytes_per_token(spec, inputs).forward_peak:
            return  # fused linear cross-entropy: chunks only
        c, v = act.compute_bytes(inputs), spec.vocab_size * tokens
        cast = act.head_cast_bytes(spec, inputs)  # an upcast fp32 LM head's low-precision weight copy
        head_cast = [self.alloc(cast)] if cast else []
        logits = self.alloc(c * v)
        softcap = [self.alloc(c * v)] if spec.final_logit_softcapping else []
        upcast = self.alloc(4 * v) if c != 4 else None
        log_probs = self.alloc(4 * v)  # saved for the backward
        for key in ([upcast] if upcast is not None else []) + [logits]:
            self.free(key)
        grad_log_probs = self.alloc(4 * v)
        grad_upcast = self.alloc(4 * v)
        self.free(grad_log_probs)
        self.free(log_probs)
        grad_logits = self.alloc(c * v) if c != 4 else None
        self.free(grad_upcast)
        self.free_all(softcap)
        self.free_all(head_cast)
        if grad_logits is not None:
            self.free(grad_logits)

    def _reduce_scatter(self, unsharded: list[int], index: int) -> list[int]:
        """FSDP/ZeRO-3 full fine-tuning: the layer's full gradient is reduced into a shard, then freed."""
        shards = [self.alloc(p * self.grad_bytes / self.shards) for p in self.per_layer[index]]
        self.free_all(unsharded)
        return shards

    def optimizer_step(self) -> None:
        table = load("optimizers")
        info = table["optimizers"][self.inputs.optim]
        if self.inputs.offload == "none" and not self.states_made:
            per = 4 if info["state_dtype"] == "fp32" else self.grad_bytes  # torch keeps states in the param's dtype
            if info["state_dtype"] == "int8":
                per = 1
            trainable = [p for layer in self.per_layer for p in layer] + self.extra
            states = info["states"] if not info.get("factored") else 0
            divisor = self.shards if self.inputs.shard not in ("zero1", "zero2") else self.inputs.world_size
            for numel in trainable:
                for _ in range(states):
                    self.alloc(numel * per / divisor)
            self.states_made = True
        temp: list[int] = []
        if info["step_temp"] == "foreach":
            temp = [self.alloc(self.allocator.requested_by(g)) for g in self.grads]
        self.free_all(temp)
        self.free_all(self.grads)  # zero_grad(set_to_none=True)

    def run(self) -> CachingAllocator:
        inputs = self.inputs
        self.load_model()
        lengths = [inputs.seq_len, inputs.seq_len] if inputs.packing else [max(inputs.seq_len // 2, 1), inputs.seq_len]
        for seq in lengths:
            for micro in range(inputs.distinct_micro_batches):
                self.micro_batch(inputs.batch_size * seq, seq, first=micro == 0)
            self.optimizer_step()
        return self.allocator


def _key(spec: ModelSpec, inputs: PlanInputs) -> tuple[object, ...]:
    values = inputs.to_dict()
    values["modules_to_save"] = tuple(values["modules_to_save"])
    return (spec, *sorted(values.items()))


def allocator_slack(spec: ModelSpec, inputs: PlanInputs) -> int:
    """Bytes the caching allocator reserves beyond what the step's tensors request, at the peaks."""
    key = _key(spec, inputs)
    if key not in _cache:
        if len(_cache) > 512:
            _cache.clear()
        result = _Step(spec, inputs).run()
        _cache[key] = max(result.peak_reserved - result.peak_requested, 0)
    return _cache[key]

