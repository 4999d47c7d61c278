"""Measure a training step's peak memory by tracing it under ``FakeTensorMode`` (``--exact``).

No memory is allocated and no weight is read: the model is built on the meta device, moved to
fake CPU tensors, and two full optimizer steps run under ``MemTracker``. The second step's peak is
the steady state (optimizer states exist while activations are alive).

Three contained workarounds:

* ``MemTracker`` registers a grad hook on every parameter, which fails for frozen ones; frozen
  parameters get a no-op entry in its handle table so it skips them.
* ``MemTracker``'s per-module statistics come from ``ModTracker``, whose hooks put every module
  output's autograd node in a reference cycle (a multi-grad hook that holds the nodes it hangs on).
  A temporary a module returns, such as DoRA's ``lora_B(lora_A(eye))`` under its detached weight
  norm, then keeps its saved tensors until the cycle collector runs, which no real run does: the
  traced DoRA step read 6-12% over the same step on real tensors. The tracer keeps the device peak only,
  so it runs without those hooks (:class:`_NoModuleHooks`) and marks the backward itself.
* bitsandbytes' ``Params4bit`` cannot wrap a FakeTensor, so QLoRA's 4-bit linears are stood in
  for by :class:`_Fake4bitLinear`, which holds the same packed bytes and quantization constants
  and calls bitsandbytes' own ``matmul_4bit`` (whose ops have fake kernels).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

from hf_ftkit._compat import enable_checkpointing
from hf_ftkit._dtypes import to_torch
from hf_ftkit.planner.activations import packed_row, padded_batch
from hf_ftkit.planner.inputs import PlanInputs

_CATEGORIES = ("PARAM", "BUFFER", "GRAD", "ACT", "TEMP", "OPT", "OTH")


@dataclass(frozen=True)
class TraceResult:
    """Peak bytes of one traced training step, total and by MemTracker category.

    ``events`` lists every storage's allocation and release in order (``(key, bytes, is_alloc)``),
    which :func:`hf_ftkit.planner.allocator.replay` turns into a reserved peak. ``phase_peaks`` is the peak of
    each phase in order (every micro-batch's forward, its backward and that backward's part from the bottom decoder
    layer on; every optimizer step): the same phases for any number of layers, which lets
    :mod:`hf_ftkit.planner.layer_trace` extrapolate each on its own.
    """

    peak_bytes: int
    by_category: dict[str, int]
    events: tuple[tuple[object, int, bool], ...] = ()
    phase_peaks: tuple[int, ...] = ()


class _NoHandle:
    def remove(self) -> None:
        return None


class _NoModuleHooks:
    """Stands in for ``MemTracker``'s ``ModTracker``: no module hooks, so no reference cycles; ``is_bw`` is set by
    the trace loop (tensors made in the backward count as ``TEMP``, as the module hooks would have had them)."""

    is_bw = False

    def register_user_hooks(self, *hooks: Any) -> None:
        return None

    def clear_user_hooks(self) -> None:
        return None

    def __enter__(self) -> _NoModuleHooks:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def _peak_only_tracker() -> Any:
    """A ``MemTracker`` that keeps the device peak only.

    The stock tracker refreshes every module's peak on every op (O(ops x modules)), which makes a
    30-layer step take minutes; the device-wide peak is all a plan needs.
    """
    from copy import deepcopy

    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakOnlyTracker(MemTracker):
        """Also records every storage's allocation and release, in order, for the allocator model, and the
        peak of each phase the trace loop marks (:meth:`end_phase`)."""

        events: list[tuple[object, int, bool]] = []
        _keys: dict[int, int] = {}
        phase_peaks: list[int] = []
        _phase_peak = 0
        _upper_peak: int | None = None

        def _level(self) -> int:
            return sum(snap[_TOTAL_KEY] for snap in self._curr_mem_snap.values())

        def end_phase(self) -> None:
            """Close the current phase: record its peak; the next one starts from what is allocated now."""
            self.phase_peaks.append(self._phase_peak)
            self._phase_peak = self._level()

        def bottom_reached(self) -> None:
            """The backward reached the bottom decoder layer: its part from there on is watched apart."""
            self._upper_peak = max(self._upper_peak or 0, self._phase_peak)  # a layer run twice marks twice
            self._phase_peak = self._level()

        def end_backward(self) -> None:
            """Close a backward: record the peak of the whole of it, then that of its part from the bottom layer on
            (the whole again for a backward that never reached the bottom layer: no gradient flows there)."""
            self.phase_peaks.append(max(self._phase_peak, self._upper_peak or 0))
            self._upper_peak = None
            self.end_phase()

        def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: int | None = None,
                         old_reftype: Any = None) -> None:
            super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
            name = u_type.name
            if name == "SIZE" and id(winfo) in self._keys:  # a resize: the old block goes, a new one comes
                self.events.append((self._keys.pop(id(winfo)), int(old_mem_consumed or 0), False))
                name = "ADD"
            if name == "ADD" and winfo.mem_consumed > 0:
                key = self._keys[id(winfo)] = len(self.events)
                self.events.append((key, int(winfo.mem_consumed), True))
            elif name == "DEL" and id(winfo) in self._keys:
                self.events.append((self._keys.pop(id(winfo)), int(winfo.mem_consumed), False))

        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, snap in self._curr_mem_snap.items():
                self._phase_peak = max(self._phase_peak, snap[_TOTAL_KEY])
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(snap)

    tracker = PeakOnlyTracker()
    tracker.events, tracker._keys, tracker.phase_peaks = [], {}, []
    tracker._mod_tracker = cast(Any, _NoModuleHooks())
    return tracker


def _make_4bit_class() -> Any:
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import QuantState

    class Fake4bitLinear(torch.nn.Module):
        """Memory stand-in for ``bnb.nn.Linear4bit``: packed 4-bit weight + absmax, real bnb matmul."""

        packed_4bit = True  # its weight holds packed bytes, as a Params4bit does (the fp32 upcast leaves it alone)

        def __init__(self, linear: torch.nn.Module, inputs: PlanInputs, block: int) -> None:
            super().__init__()
            out_f, in_f = cast(torch.Tensor, linear.weight).shape
            if not isinstance(linear, torch.nn.Linear):  # transformers' Conv1D (GPT-2) stores (in, out)
                in_f, out_f = out_f, in_f
            self.in_features, self.out_features = in_f, out_f
            storage = to_torch(inputs.quant_storage)
            packed = (out_f * in_f + 1) // 2 // storage.itemsize
            self.weight = torch.nn.Parameter(
                torch.empty(packed, 1, dtype=storage, device="meta"), requires_grad=False
            )
            blocks = -(-out_f * in_f // block)
            if inputs.double_quant:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device="meta"))
                self.register_buffer("absmax2", torch.empty(-(-blocks // 256), dtype=torch.float32, device="meta"))
            else:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.float32, device="meta"))
            self.bias = cast("torch.Tensor | None", linear.bias)
            self._shape = (out_f, in_f)
            self._block = block
            self._quant_type = inputs.quant_type
            self._compute = to_torch(inputs.compute_dtype)
            self._nested = inputs.double_quant

        @property
        def W_q(self) -> torch.Tensor:  # noqa: N802 - PEFT's DoRA dequantizes any base layer that has W_q
            return self.weight

        def dequantize(self) -> torch.Tensor:
            """What DoRA's weight norm reads: the weight dequantized in the compute dtype (a fresh tensor)."""
            return torch.empty(self._shape, dtype=self._compute)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            code = torch.zeros(16, dtype=torch.float32)
            if self._nested:
                state2 = QuantState(absmax=self.absmax2, code=torch.zeros(256), blocksize=256, dtype=torch.float32)
                qs = QuantState(
                    absmax=self.absmax, shape=torch.Size(self._shape), code=code, blocksize=self._block,
                    quant_type=self._quant_type, dtype=self._compute, offset=torch.zeros(()), state2=state2,
                )
            else:
                qs = QuantState(
                    absmax=self.absmax, shape=torch.Size(self._shape), code=code, blocksize=self._block,
                    quant_type=self._quant_type, dtype=self._compute,
                )
            # a wider quant_storage (bf16 for FSDP) holds the same bytes: read them as the packed (n, 1) uint8 column
            # bitsandbytes' matmul expects (viewing (n/2, 1) bf16 as uint8 gives (n/2, 2), which it cannot flatten)
            weight = self.weight.view(torch.uint8).view(-1, 1)
            # like bnb.nn.Linear4bit: compute in the compute dtype, return in the input's dtype (fp32 after
            # prepare_model_for_kbit_training's upcast)
            bias = None if self.bias is None else self.bias.to(self._compute)  # bnb casts an upcast bias back
            out = bnb.matmul_4bit(x.to(self._compute), weight.t(), bias=bias, quant_state=qs)
            return out.to(x.dtype)

    return Fake4bitLinear


def _quantize_linears(model: Any, inputs: PlanInputs) -> None:
    """Replace every decoder nn.Linear and Conv1D (LoRA base layers included) by the 4-bit stand-in, as
    transformers' bitsandbytes integration does."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from hf_ftkit._data import load

    fake_cls = _make_4bit_class()
    block = int(load("constants")["nf4_block"])
    head = model.get_output_embeddings()
    heads = {id(head), id(getattr(head, "original_module", head))}  # PEFT's modules_to_save wraps the LM head
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            linear = type(child) is torch.nn.Linear or isinstance(child, Conv1D)
            if linear and id(child) not in heads and not _is_adapter(name):
                setattr(parent, name, fake_cls(child, inputs, block))
                if name == "base_layer":
                    # a run quantizes before PEFT wraps: PEFT then finds a Linear4bit where GPT-2 has a Conv1D,
                    # so the adapter (and DoRA's weight norm) reads the weight as (out, in)
                    for module in parent.modules():
                        if getattr(module, "fan_in_fan_out", False):
                            module.fan_in_fan_out = False


def _is_adapter(name: str) -> bool:
    return name.startswith("lora_") or name in {"default"}


def build_traced_model(config: Any, inputs: PlanInputs, layers: tuple[int, ...] | None = None) -> Any:
    """The model exactly as the run would hold it (method, dtype, GC), on the meta device; with ``layers``, only
    those decoder layers of it (:func:`hf_ftkit.planner.structure.keep_layers`)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    supported = bool(getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_supports_sdpa", True))
    # flash-attention keeps what SDPA's fused kernels keep (output + log-sum-exp): trace it as sdpa
    config._attn_implementation = "sdpa" if supported and inputs.attn_implementation != "eager" else "eager"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=to_torch(inputs.weight_dtype))
    if layers is not None:
        from hf_ftkit.planner.structure import keep_layers

        keep_layers(model, layers)
    if inputs.gradient_checkpointing:
        enable_checkpointing(model)
    if inputs.is_peft:
        from peft import LoraConfig, get_peft_model

        targets = inputs.target_names() or "all-linear"
        lora = LoraConfig(
            r=inputs.lora_r, lora_alpha=2 * inputs.lora_r, lora_dropout=inputs.lora_dropout,
            target_modules=targets, use_dora=inputs.dora,
            modules_to_save=list(inputs.modules_to_save) or None, task_type="CAUSAL_LM",
        )
        if inputs.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lora)
        if inputs.quantized_base:
            _quantize_linears(model, inputs)
            if inputs.kbit_upcast:
                # prepare_model_for_kbit_training runs before get_peft_model: every unquantized weight is fp32,
                # the modules_to_save copies PEFT then makes of them included; it leaves Params4bit alone (the packed
                # weights, which a bf16 quant_storage makes bf16 tensors)
                packed = {id(m.weight) for m in model.modules() if getattr(m, "packed_4bit", False)}
                for param in model.parameters():
                    if param.dtype in (torch.bfloat16, torch.float16) and id(param) not in packed:
                        param.data = param.data.float()
        if inputs.adapter_dtype != "fp32":
            # autocast_adapter_dtype=False, or TRL's cast of a 4-bit base's adapters (DoRA's magnitudes stay fp32)
            for name, param in model.named_parameters():
                if "lora_" in name and "magnitude" not in name:
                    param.data = param.data.to(to_torch(inputs.adapter_dtype))
    model.train()
    return model


def _make_optimizer(model: Any, inputs: PlanInputs) -> Any:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="/nonexistent", optim=inputs.optim, use_cpu=True, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if inputs.optim in ("adamw_torch", "adamw_hf", "adagrad", "rmsprop"):
        kwargs["foreach"] = True  # the CUDA default; CPU would pick the per-tensor loop
    if inputs.optim == "adamw_torch_fused":
        kwargs["fused"] = True
    params = [p for p in model.parameters() if p.requires_grad]
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # bitsandbytes builds its quantile maps from real values at construction; states stay fake.
    with unset_fake_temporarily():
        return cls(params, **kwargs)


@contextmanager
def _cuda_style_dropout() -> Iterator[None]:
    """Make dropout keep a one-byte mask, as CUDA's fused kernel does.

    On CPU, ``F.dropout`` multiplies by a noise tensor in the input dtype and keeps that (4 bytes
    per element for fp32), which would overstate what a GPU run holds.
    """
    import torch
    import torch.nn.functional as F

    original = F.dropout

    def dropout(x: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if not training or p == 0.0:
            return x
        return torch.ops.aten.native_dropout(x, p, True)[0]

    F.dropout = dropout  # type: ignore[assignment]
    try:
        yield
    finally:
        F.dropout = original


@contextmanager
def _grouped_mm_bf16_only() -> Iterator[None]:
    """Route MoE experts with non-bf16 weights to transformers' grouped-mm fallback.

    ``grouped_mm`` (CUDA and fake kernels alike) takes bf16 only; fp32 master weights of a mixed
    precision full fine-tune go through the fallback op, as they would have to on a GPU.
    """
    try:
        from transformers.integrations import moe
    except ImportError:  # pragma: no cover - older transformers without the MoE integration
        yield
        return
    original = moe._can_use_grouped_mm

    def can_use(input: Any, weight: Any, offs: Any) -> bool:
        import torch

        return bool(weight.dtype == torch.bfloat16 and input.dtype == torch.bfloat16 and original(input, weight, offs))

    moe._can_use_grouped_mm = can_use
    try:
        yield
    finally:
        moe._can_use_grouped_mm = original


@contextmanager
def _unpacked_positions(unpacked: bool) -> Iterator[None]:
    """Let transformers see that a traced batch holds one sequence per row (``unpacked``), as it does on real tensors.

    Such a batch gets no position ids, so the model numbers every row 0..S-1. On real tensors transformers reads
    those values, finds no packed sequences and hands SDPA ``is_causal`` instead of a mask (while no padding and no
    sliding window needs one). Under FakeTensorMode it cannot read them, so it builds a (B, 1, S, S) packed-sequence
    mask that a real step never holds: each checkpointed layer keeps it, and each recomputed layer's SDPA converts it
    to the query dtype (3 x B x S^2 bytes above a real step's peak, seen against ``trace_step(real=True)``).
    """
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers before its masking utilities
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None or not unpacked:  # a packed row: transformers builds its mask from the fake values too
        yield
        return

    def no_packed_sequences(position_ids: Any) -> None:
        return None

    masking_utils.find_packed_sequence_indices = no_packed_sequences
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _shared_parameters(model: Any) -> list[list[tuple[Any, str]]]:
    """The parameters several modules hold (tied input and output embeddings, also under PEFT's
    ``modules_to_save`` wrappers; a block shared between layers, as Zamba's), each as its holders."""
    holders: dict[int, list[tuple[Any, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, name))
    return [found for found in holders.values() if len(found) > 1]


def _retie(shared: list[list[tuple[Any, str]]]) -> None:
    """Share again what :func:`_shared_parameters` found shared: ``to_empty()`` replaces each module's parameters
    one by one, which unties them. (transformers' ``tie_weights`` cannot: it sets no weight on a PEFT wrapper, and
    its patterns name layers by their index in the full model, which a cut model renumbers.)"""
    for (module, name), *others in shared:
        for other, other_name in others:
            other._parameters[other_name] = module._parameters[name]


@contextmanager
def _marking_bottom_layer(model: Any, layers: tuple[int, ...] | None, tracker: Any) -> Iterator[None]:
    """Watch each backward's part from where it reaches the bottom decoder layer (the last it runs through).

    Within the backward, memory moves by the same amount at every layer (saved activations go, the layer's
    gradients come), so it peaks near the backward's start (the loss's and the logits' gradients, the top layers'
    recomputation under checkpointing) or at its end, with every gradient made and the bottom layer's own backward
    under way. Which of the two is higher can change with depth: a few layers' traces peak near the start while a
    deep model, whose gradients outweigh the logits, peaks at the end. The whole backward and its bottom part,
    each extrapolated on its own (:mod:`hf_ftkit.planner.layer_trace`), follow both."""
    import torch

    from hf_ftkit.planner.structure import decoder_stack

    try:
        stack = decoder_stack(model, len(layers) if layers is not None else None)
    except ValueError:  # no stack found: the backward stays one phase (counted twice)
        yield
        return

    def mark(module: Any, args: Any, output: Any) -> None:
        if tracker._mod_tracker.is_bw:
            return  # the layer's recomputation under checkpointing
        values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) \
            else (output,)
        hidden = next((value for value in values if isinstance(value, torch.Tensor)), None)
        if hidden is not None and hidden.requires_grad:
            hidden.register_hook(lambda grad: tracker.bottom_reached())

    handle = stack[0].register_forward_hook(mark)
    try:
        yield
    finally:
        handle.remove()


class _OffloadedActivations:
    """Activation offloading as TRL's ``activation_offloading`` runs it (``get_act_offloading_ctx_manager``: its
    ``OffloadActivations`` with streams, around the whole training step), for the tracer.

    Every tensor the step saves for the backward, of 1 KiB or more and not (a view of) a parameter, goes to host
    memory, except what the LM head saves (TRL does not see it). The tensors of the last five saves stay on the
    device while their copy runs (TRL's forward stash). A storage saved again while TRL still tracks it stays on the
    device (TRL does not offload it twice), and is then tracked until the backward: every later save of it stays
    too (the RMSNorm's fp32 input, saved twice in a row; RoPE's cos and sin, saved in every layer). The backward
    brings each offloaded tensor back when a node needs it: a fresh device tensor, freed once the next node that
    brings tensors back has run (TRL's backward stash); the forward stash goes then too. Host memory is not device
    memory, so an offloaded tensor is simply let go here. With checkpointing, what the forward saves is each layer's
    input (the recomputation's saves are the checkpoint's own): transformers' ``offload`` of the checkpointed
    inputs frees the same, without the stash. ``tests/planner/test_offloading.py`` holds these decisions to TRL's
    own class run on real tensors."""

    MIN_BYTES = 1024  # TRL's min_offload_size
    STASH = 5  # TRL's max_fwd_stash_size

    def __init__(self, model: Any) -> None:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef

        self._storage = StorageWeakRef
        self._params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}  # and their views
        self._in_head = False
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(lambda *args: setattr(self, "_in_head", True))
            head.register_forward_hook(lambda *args: setattr(self, "_in_head", False), always_call=True)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._reset()

    def _reset(self) -> None:
        self._saves = 0
        self._stash: dict[int, Any] = {}  # save number -> the device tensor, while its copy runs
        self._tracked: dict[Any, int] = {}  # storage key -> the last save of it TRL tracks
        self._key_of: dict[int, Any] = {}
        self._node: Any = None
        self._nodes = 0
        self._restored: list[list[Any]] = [[], []]  # brought back for the current node and the one before

    def _release(self, number: int) -> None:
        key = self._key_of.pop(number, None)
        if key is not None and self._tracked.get(key) == number:
            del self._tracked[key]

    def _pack(self, tensor: Any) -> Any:
        import torch

        if self._in_head:
            return (None, tensor)
        self._saves += 1
        number = self._saves
        key = (self._storage(tensor.untyped_storage()), tensor.storage_offset(), tensor.dtype)  # TRL's storage key
        if key in self._tracked:  # saved again: stays on the device, tracked from this save on
            self._tracked[key], self._key_of[number] = number, key
            return (number, tensor)
        if tensor.nbytes < self.MIN_BYTES or isinstance(tensor, torch.nn.Parameter) or key[0] in self._params:
            return (None, tensor)
        for old in [n for n in self._stash if n <= number - self.STASH]:
            del self._stash[old]
            self._release(old)
        self._stash[number] = tensor
        self._tracked[key], self._key_of[number] = number, key
        return (number, (tensor.shape, tensor.stride(), tensor.dtype, tensor.device))

    def _unpack(self, packed: Any) -> Any:
        import torch

        number, kept = packed
        if number is not None:
            self._release(number)
        if number is None or isinstance(kept, torch.Tensor):
            return kept
        node = torch._C._current_autograd_node()
        if node is not self._node:
            self._node, self._nodes = node, self._nodes + 1
            self._restored = [[], self._restored[0]]
            if self._nodes > 1:
                for old in list(self._stash):
                    del self._stash[old]
                    self._release(old)
        if number in self._stash:
            return self._stash[number]
        shape, stride, dtype, device = kept
        restored = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        self._restored[0].append(restored)
        return restored

    def __enter__(self) -> _OffloadedActivations:
        self._reset()  # TRL starts each training step afresh
        self._hooks.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self._hooks.__exit__(*args)
        self._reset()  # TRL waits for and drops what it still holds


def batch_ids(inputs: PlanInputs, seq: int) -> tuple[Any, Any]:
    """A micro-batch of ``seq``-token sequences and the position ids the collator passes with it: B rows, or TRL's
    padding-free single row whose positions restart at each sequence, where SDPA or eager attention needs its mask
    (a packed row of one micro-batch holds two sequences). Flash attention's varlen kernel keeps per token what it
    keeps for B rows, and its stand-in here, SDPA without a mask, runs on B rows."""
    import torch

    if not packed_row(inputs):
        return torch.zeros((inputs.batch_size, seq), dtype=torch.long), None
    count = inputs.batch_size if inputs.batch_size > 1 or not inputs.packing else 2
    lengths = [len(part) for part in torch.arange(inputs.batch_size * seq).chunk(count)]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return torch.zeros((1, inputs.batch_size * seq), dtype=torch.long), positions


def padding_mask(ids: Any, padded: bool) -> Any:
    """The attention mask of a batch of ``ids`` the plan holds as padded: one padded position, so transformers
    builds the mask a padded batch gets (None for an unpadded batch). The tracer and the sharded benchmarks share it.
    """
    if not padded:
        return None
    import torch

    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    return mask


def trace_step(config: Any, inputs: PlanInputs, steps: int = 2, *, real: bool = False,
               layers: tuple[int, ...] | None = None) -> TraceResult:
    """Peak memory of a training step of ``config`` under ``inputs``, traced without allocating.

    Sharding is not traced: the result is a single-device step (``gpus=1``). ``real=True`` runs the same step on
    real CPU tensors (random weights; it allocates everything, so small configs only and no 4-bit base): a
    reference without FakeTensorMode. ``layers`` keeps only those decoder layers of the model. With gradient
    accumulation each step runs ``inputs.distinct_micro_batches`` micro-batches: later ones repeat the second.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    if real and inputs.quantized_base:
        raise ValueError("a real-tensor trace cannot hold a 4-bit base: trace it with real=False")
    model = build_traced_model(config, inputs, layers)
    # Trainer autocasts whenever bf16/fp16 is on, also over a model loaded in bf16; an adapter run at precision
    # bf16 is one without the flags (PlanInputs.autocast)
    autocast = inputs.autocast
    amp_dtype = to_torch(inputs.compute_dtype_name) if autocast else torch.bfloat16  # fp32: autocast is off
    shared = _shared_parameters(model)
    with nullcontext() if real else FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        if real:
            with torch.no_grad():
                for param in model.parameters():
                    param.normal_(0.0, 0.02)
        _retie(shared)
        optimizer = _make_optimizer(model, inputs)
        tracker = _peak_only_tracker()
        for param in model.parameters():
            if not param.requires_grad:
                tracker._param_to_grad_hook_handles[param] = (_NoHandle(), _NoHandle())
        tracker.track_external(optimizer)
        # the parameters and buffers, with the gradient hooks the module hooks would install (gradients count as
        # GRAD, not as backward temporaries)
        tracker._track_module_params_and_buffers(model, install_grad_hooks=True)
        offload = _OffloadedActivations(model) if inputs.activation_offloading else nullcontext()
        with tracker, _cuda_style_dropout(), _grouped_mm_bf16_only(), _unpacked_positions(not packed_row(inputs)), \
                _marking_bottom_layer(model, layers, tracker):
            # Collect the young generations first, so that whatever reference cycles remain are collected at the
            # same points of every trace, from wherever the collector's counters stood.
            gc.collect(1)
            for step in range(steps):
                # unpacked batches vary in length: the first step is a shorter one, as the reserved model assumes
                seq = inputs.seq_len if inputs.packing or step else max(inputs.seq_len // 2, 1)
                for _micro in range(inputs.distinct_micro_batches):  # earlier micro-batches' grads stay
                    ids, positions = batch_ids(inputs, seq)
                    mask = padding_mask(ids, padded_batch(inputs))
                    with offload:  # TRL's offloading context spans the forward and the backward
                        with torch.autocast("cpu", dtype=amp_dtype, enabled=autocast):
                            # TRL's SFTTrainer passes use_cache=False (transformers turns the cache off under
                            # checkpointing, and without it transformers reads no packing from the position ids)
                            loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=ids,
                                         use_cache=False).loss
                        tracker.end_phase()
                        tracker._mod_tracker.is_bw = True
                        loss.backward()
                        tracker._mod_tracker.is_bw = False
                    tracker.end_backward()
                    tracker.reset_mod_stats()  # per-module stats only; the device peak is kept
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.end_phase()
                tracker.reset_mod_stats()
        snapshot = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(snapshot.values()))
    by_category = {str(k).rsplit(".", 1)[-1]: int(v) for k, v in per_device.items() if str(k) != "Total"}
    return TraceResult(peak_bytes=int(per_device["Total"]), by_category=by_category, events=tuple(tracker.events),
                       phase_peaks=tuple(tracker.phase_peaks))
