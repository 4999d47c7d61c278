"""lora_bias adapters (a trained bias on lora_B) on a tiny Qwen2, whose q/k/v projections have biases."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from hf_ftkit.errors import BadInputError
from hf_ftkit.merge.compose import compose
from hf_ftkit.merge.run import merge_adapters

QWEN = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_ftkit.planner.structure import config_from_dict

    root = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config_from_dict(QWEN)).save_pretrained(root / "base")
    for seed, (name, alpha) in enumerate((("b1", 8), ("b2", 16))):
        torch.manual_seed(seed + 1)
        model = AutoModelForCausalLM.from_pretrained(root / "base")
        config = LoraConfig(r=4, lora_alpha=alpha, lora_bias=True, target_modules=["q_proj", "k_proj"],
                            init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn_like(param) * 0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(root / name)
    return root


def test_identity_keeps_the_bias_and_exact_sum_adds_biases(qwen):
    identity = compose(qwen / "base", [qwen / "b1"])
    original = load_file(str(qwen / "b1" / "adapter_model.safetensors"))
    assert all(torch.equal(identity.tensors[k], v) for k, v in original.items())
    both = compose(qwen / "base", [qwen / "b1", qwen / "b2"], [0.5, 2.0])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    second = load_file(str(qwen / "b2" / "adapter_model.safetensors"))
    expected = 0.5 * (8 / 4) * original[key] + 2.0 * (16 / 4) * second[key]
    assert torch.allclose(both.tensors[key], expected, atol=1e-7)
    assert both.config["lora_bias"] and both.max_error < 1e-6


def test_bias_merge_equals_peft(qwen, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merge_adapters(qwen / "base", [qwen / "b1"], tmp_path / "s", streaming=True)
    merged = load_file(str(tmp_path / "s" / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen / "base"), qwen / "b1")
        reference = reference.merge_and_unload().state_dict()
    assert merged.keys() == {k for k in reference if k != "lm_head.weight"} | {"lm_head.weight"}
    assert all(torch.equal(merged[k], reference[k]) for k in merged)
    result = merge_adapters(qwen / "base", [qwen / "b1", qwen / "b2"], tmp_path / "two", weights=[1, -1],
                            streaming=True)
    assert result.verification["passed"] and result.verification["max_abs_logit_diff"] < 1e-3


def test_approximate_methods_refuse_biases(qwen):
    with pytest.raises(BadInputError, match="cannot combine lora_bias"):
        compose(qwen / "base", [qwen / "b1", qwen / "b2"], method="linear")


def test_pickle_base_needs_allow_pickle_and_then_merges_like_safetensors(qwen, tmp_path):
    import shutil

    base = tmp_path / "pickled_base"
    base.mkdir()
    shutil.copy(qwen / "base" / "config.json", base / "config.json")
    torch.save(load_file(str(qwen / "base" / "model.safetensors")), base / "pytorch_model.bin")
    with pytest.raises(BadInputError, match="pickle weights"):
        merge_adapters(base, [qwen / "b1"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_adapters(base, [qwen / "b1"], tmp_path / "out", allow_pickle=True, streaming=True)
    merge_adapters(qwen / "base", [qwen / "b1"], tmp_path / "ref", streaming=True)
    got, want = load_file(str(tmp_path / "out/model.safetensors")), load_file(str(tmp_path / "ref/model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
