"""Activation offloading and Liger kernels in traced plans: offloading is traced as TRL runs it (its decisions held
to TRL's own class on real tensors); Liger's Triton kernels cannot run here, so traced plans add the formulas'
figure for them."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch

from hf_ftkit.errors import HfFtkitWarning
from hf_ftkit.planner.api import plan
from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.structure import config_from_dict, spec_from_config
from hf_ftkit.planner.trace import _OffloadedActivations, trace_step

DEEP_LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": False,
              "max_position_embeddings": 2048}


def _small_model(lora: bool, checkpointing: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_ftkit._compat import enable_checkpointing

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256))
    if checkpointing:
        enable_checkpointing(model)
        model.enable_input_require_grads()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.05))
    return model


def _forward_end(model, hooks_of, ids) -> dict[str, int]:
    """Bytes the forward leaves on the device (not parameters), in the forward stash, and offloaded, by
    ``hooks_of(model)``'s decisions."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ctx, decisions = hooks_of(model)
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss
        found = decisions(ctx)
        del loss  # TRL's backward needs CUDA streams; the decisions are all made in the forward
    return {k: sum(t.nbytes for t in v if k != "kept" or t.untyped_storage().data_ptr() not in params)
            for k, v in found.items()}


def _trl(model):
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    ctx = get_act_offloading_ctx_manager(model, use_pin_memory=False)
    # TRL keys a storage by its address, taken before it clones a view: hold every saved tensor, so that no freed
    # address comes back as another tensor's within the forward (the CPU allocator's reuse made this test flaky)
    held, pack = [], ctx.pack_hook
    ctx.pack_hook = lambda tensor: (held.append(tensor), pack(tensor))[1]

    def decisions(ctx):
        entries = list(ctx.tracker.values())
        return {"kept": [t for t, offloaded, *_ in entries if not offloaded],
                "offloaded": [t for t, offloaded, *_ in entries if offloaded],
                "stash": [t for t, _event in ctx.fwd_stash.values()]}
    return ctx, decisions


def _tracer(model):
    ctx = _OffloadedActivations(model)
    made: dict[str, list] = {"kept": [], "offloaded": []}
    pack = ctx._pack

    def recording(tensor):
        packed = pack(tensor)
        if not ctx._in_head:  # TRL does not see the LM head's saves
            made["kept" if packed[0] is None or isinstance(packed[1], torch.Tensor) else "offloaded"].append(tensor)
        return packed
    ctx._hooks = torch.autograd.graph.saved_tensors_hooks(recording, ctx._unpack)
    return ctx, lambda ctx: {**made, "stash": list(ctx._stash.values())}


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_tracer_offloads_what_trls_own_class_offloads(lora, checkpointing):
    # TRL's class on this CPU: the CPU stands in for the accelerator (TRL then offloads CPU tensors to the CPU);
    # the decisions are what is compared: what stays on the device, what sits in the stash, what goes
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with mock.patch.object(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cpu")), \
            mock.patch.object(torch.cpu.Stream, "synchronize", lambda self: None, create=True), \
            mock.patch.object(torch.cpu, "empty_cache", lambda: None, create=True):
        trl = _forward_end(_small_model(lora, checkpointing), _trl, ids)
    ours = _forward_end(_small_model(lora, checkpointing), _tracer, ids)
    assert ours == trl
    assert trl["offloaded"] > trl["kept"] > 0 and trl["stash"] > 0


@pytest.mark.parametrize("method", ["full", pytest.param("lora", marks=pytest.mark.slow)])  # 6 s: whole suite only
def test_offloading_with_checkpointing_frees_what_the_formulas_plan(method):
    # the formulas' saving rests on transformers' measured figure (tests/planner/test_estimate.py); the trace runs
    # TRL's offloading: both free every checkpointed input but a couple
    spec = spec_from_config(dict(DEEP_LLAMA), "deep-llama")
    kept = PlanInputs(method=method, gradient_checkpointing=True, seq_len=512, batch_size=2)
    offloaded = kept.replace(activation_offloading=True)
    traced = {off: trace_step(config_from_dict(dict(DEEP_LLAMA)), i).peak_bytes
              for off, i in ((False, kept), (True, offloaded))}
    checkpoint = 2 * 512 * 256 * 2  # one layer's bf16 input
    assert traced[False] - traced[True] >= (8 - 2) * checkpoint
    planned = estimate(spec, offloaded).allocated_peak_bytes
    assert 0.99 * traced[True] <= planned <= 1.02 * traced[True]


@pytest.mark.parametrize("method", ["full", pytest.param("lora", marks=pytest.mark.slow)])  # 7 s: whole suite only
def test_offloading_without_checkpointing_is_planned_from_traced_layers(method, tmp_path, monkeypatch):
    # TRL leaves on the device, in every layer, each storage saved twice in a row (RMSNorm's fp32 input) and
    # what a layer saves again (RoPE's cos and sin): the formulas planned this 9-21% high on these 8 layers
    # (and 10% low on SmolLM2-360M), the traced layers hold it
    monkeypatch.setenv("HF_FTKIT_CACHE", str(tmp_path))
    spec = spec_from_config(dict(DEEP_LLAMA), "deep-llama")
    inputs = PlanInputs(method=method, seq_len=512, batch_size=2, activation_offloading=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HfFtkitWarning)
        planned = plan(spec, inputs)
    traced = trace_step(config_from_dict(dict(DEEP_LLAMA)), inputs).peak_bytes
    assert 0.99 * traced <= planned.allocated_peak_bytes <= 1.01 * traced
    assert any("activation offloading without checkpointing" in w for w in planned.warnings)
    assert any(issubclass(w.category, HfFtkitWarning) for w in caught)
    whole = trace_step(config_from_dict(dict(DEEP_LLAMA)), inputs.replace(activation_offloading=False)).peak_bytes
    assert traced < 0.8 * whole  # offloading is traced at all


def test_exact_plans_add_the_formulas_liger_saving_with_a_warning(tiny_llama_config, tiny_llama_spec):
    inputs = PlanInputs(method="lora", seq_len=512, batch_size=2)
    liger = inputs.replace(use_liger_kernel=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HfFtkitWarning)
        plain, fused = (plan(tiny_llama_spec, i, exact=True) for i in (inputs, liger))
    saving = (estimate(tiny_llama_spec, inputs).allocated_peak_bytes
              - estimate(tiny_llama_spec, liger).allocated_peak_bytes)
    assert saving > 2 * 1024 * 4096 * 4  # more than one fp32 copy of the logits
    assert plain.allocated_peak_bytes - fused.allocated_peak_bytes == saving
    assert any("without Liger's Triton kernels" in w for w in fused.warnings)
    assert not any("Liger" in w for w in plain.warnings)


def test_traced_layer_plans_keep_the_formulas_liger_saving(tmp_path, monkeypatch):
    # before, a traced-layer plan took the trace's logits (no Liger) for a correction of the formulas' per-layer
    # memory, which undid Liger's saving
    monkeypatch.setenv("HF_FTKIT_CACHE", str(tmp_path))
    gpt2 = {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 8, "vocab_size": 4096, "n_positions": 1024,
            "bos_token_id": 0, "eos_token_id": 0}
    spec = spec_from_config(gpt2, "gpt2")
    inputs = PlanInputs(method="lora", gradient_checkpointing=True, seq_len=512, batch_size=2)
    liger = inputs.replace(use_liger_kernel=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HfFtkitWarning)
        plain, fused = (plan(spec, i).allocated_peak_bytes for i in (inputs, liger))
    saving = estimate(spec, inputs).allocated_peak_bytes - estimate(spec, liger).allocated_peak_bytes
    assert saving > 0
    assert plain - fused == saving
