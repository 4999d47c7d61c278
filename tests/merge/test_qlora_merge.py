"""QLoRA adapters: merged into the dequantized NF4 base (matches training) or the original 16-bit base."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_ftkit.merge.run import merge_adapters
from hf_ftkit.merge.streaming import QloraTarget

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qlora_adapter(smollm2_dir, tmp_path_factory) -> Path:
    """A LoRA built on SmolLM2 loaded in 4-bit NF4 (bitsandbytes, CPU), as QLoRA training builds it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=bnb, dtype=torch.bfloat16)
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    peft_model.save_pretrained(out)
    return out


def test_dequantized_target_matches_training_and_original_does_not(smollm2_dir, qlora_adapter, tmp_path):
    deq = merge_adapters(smollm2_dir, [qlora_adapter], tmp_path / "deq", dtype="bf16", streaming=True,
                         qlora=QloraTarget("dequantized"))
    orig = merge_adapters(smollm2_dir, [qlora_adapter], tmp_path / "orig", dtype="bf16", streaming=True,
                          qlora=QloraTarget("original"))
    assert deq.verification["passed"] and orig.verification["passed"]
    # against the 4-bit model the adapter was trained with, the dequantized target is the closer one
    assert deq.qlora["merged_vs_training"] < orig.qlora["merged_vs_training"]
    assert deq.qlora["merged_vs_training"] < deq.qlora["original_target_vs_training"]
    assert deq.qlora["target"] == "dequantized" and orig.qlora["target"] == "original"


def test_dequantized_weights_are_bitsandbytes_roundtrip_plus_delta(smollm2_dir, qlora_adapter, tmp_path):
    import bitsandbytes.functional as F

    from hf_ftkit.merge.adapters import read_adapter

    merge_adapters(smollm2_dir, [qlora_adapter], tmp_path / "s", dtype="bf16", streaming=True,
                   qlora=QloraTarget("dequantized"), verify=False)
    merge_adapters(smollm2_dir, [qlora_adapter], tmp_path / "m", dtype="bf16", qlora=QloraTarget("dequantized"),
                   verify=False)
    streamed = load_file(str(tmp_path / "s/model.safetensors"))
    in_memory = load_file(str(tmp_path / "m/model.safetensors"))
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    base = load_file(str(smollm2_dir / "model.safetensors"))
    name = "model.layers.2.mlp.up_proj"
    packed, state = F.quantize_4bit(base[f"{name}.weight"].to(torch.bfloat16), quant_type="nf4")
    expected = F.dequantize_4bit(packed, state).float() + read_adapter(qlora_adapter).modules()[name].delta()
    assert torch.equal(streamed[f"{name}.weight"], expected.to(torch.bfloat16))
    # norms and embeddings are not quantized by bitsandbytes: unchanged
    assert torch.equal(streamed["model.norm.weight"], base["model.norm.weight"].to(torch.bfloat16))


def test_dequantized_base_is_what_the_4bit_layers_compute_with(smollm2_dir):
    """The reference the dequantized target reproduces is exactly bitsandbytes' own view of the 4-bit base."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hf_ftkit.merge.streaming import dequantized

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=bnb, dtype=torch.bfloat16)
    base = load_file(str(smollm2_dir / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        weight = model.get_submodule(name).weight
        in_training = F.dequantize_4bit(weight.data, weight.quant_state)
        assert torch.equal(dequantized(base[f"{name}.weight"], QloraTarget()), in_training)
