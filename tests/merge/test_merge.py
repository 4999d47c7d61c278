"""Merges on the real SmolLM2-135M (tied embeddings): in memory and streaming, against PEFT tensor by tensor."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_ftkit.merge.run import merge_adapters

pytestmark = pytest.mark.slow


def written(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype, untie: bool) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload on the same inputs (untied first where the merge must untie)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if untie:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    state = merged.state_dict()
    return state if untie else {k: v for k, v in state.items() if k != "lm_head.weight"}


# every adapter kind in fp32 (a plain pair through rsLoRA, the same path with another scale); bf16 for a plain
# pair, DoRA and a tied head (rsLoRA and the embedding take the same bf16 paths as the plain pair and the head)
@pytest.mark.parametrize("dtype, name", [("fp32", n) for n in ("rslora", "dora", "head", "embed")]
                         + [("bf16", n) for n in ("task_a", "dora", "head")])
def test_streaming_and_in_memory_equal_peft(smollm2_dir, adapters, tmp_path, name, dtype):
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    untie = name in ("head", "embed")  # both touch a tied weight
    reference = peft_merged(smollm2_dir, adapters[name], torch_dtype, untie)
    for streaming in (True, False):
        out = tmp_path / f"out-{streaming}"
        # the in-memory merge writes the same bits (asserted below), so one verification covers both
        result = merge_adapters(smollm2_dir, [adapters[name]], out, dtype=dtype, streaming=streaming,
                                max_shard_bytes=150_000_000, verify=streaming)
        got = written(out)
        assert got.keys() == reference.keys()
        for key, want in reference.items():
            assert got[key].dtype == torch_dtype
            assert torch.equal(got[key], want), key  # bitwise, in bf16 too (the base is loaded in bf16 first)
        if streaming:
            assert result.verification["passed"]
            if dtype == "fp32":
                assert result.verification["max_abs_logit_diff"] < 1e-3
                assert result.verification["top1_agreement"] == 1
            else:  # bf16 rounding alone moves SmolLM2's logits by ~1-2 and flips near-ties
                assert result.verification["top1_agreement"] > 0.8
        config = json.loads((out / "config.json").read_text())
        assert config["tie_word_embeddings"] is (not untie)
        assert config["dtype"] == str(torch_dtype).removeprefix("torch.")


def test_streaming_writes_shards_index_tokenizer_and_generation_config(smollm2_dir, adapters, tmp_path):
    out = tmp_path / "merged"
    merge_adapters(smollm2_dir, [adapters["task_a"]], out, streaming=True, max_shard_bytes=100_000_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written(out).values())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes()
    assert not list(tmp_path.glob(".merged*"))  # no partial directory left beside it


def test_untied_merge_reloads_as_the_adapter_model(smollm2_dir, adapters, tmp_path):
    """A merge that changes one side of tied embeddings must not be re-tied on load (transformers #45127)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    merge_adapters(smollm2_dir, [adapters["embed"]], out, dtype="fp32", streaming=True)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), adapters["embed"])
        expected = adapter_model(ids).logits
        naive = peft_merged(smollm2_dir, adapters["embed"], torch.float32, untie=False)  # tied merge: the bug
    assert torch.allclose(merged, expected, atol=1e-3)
    assert not torch.equal(naive["model.embed_tokens.weight"], written(out)["lm_head.weight"])


def test_two_adapters_merge_equals_their_weighted_sum(smollm2_dir, adapters, tmp_path):
    out = tmp_path / "merged"
    result = merge_adapters(smollm2_dir, [adapters["task_a"], adapters["rslora"]], out, weights=[0.5, 1.5],
                            dtype="fp32", streaming=True)
    assert result.composition["exact"] and result.composition["max_relative_error"] < 1e-6
    from hf_ftkit.merge.adapters import read_adapter

    base = load_file(str(smollm2_dir / "model.safetensors"))
    name = "model.layers.5.self_attn.q_proj"
    delta = 0.5 * read_adapter(adapters["task_a"]).modules()[name].delta()
    delta += 1.5 * read_adapter(adapters["rslora"]).modules()[name].delta()
    got = written(out)[f"{name}.weight"]
    assert torch.allclose(got, base[f"{name}.weight"] + delta, atol=1e-5)
    assert result.verification["passed"]


def test_adapter_only_output_is_a_loadable_peft_adapter(smollm2_dir, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "composed"
    result = merge_adapters(smollm2_dir, [adapters["narrow_a"], adapters["narrow_b"]], out, weights=[1, 1],
                            adapter_only=True)
    assert result.mode == "adapter" and (out / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), out)
    assert model.peft_config["default"].r == 16


def test_layer_check_is_used_when_the_model_does_not_fit_in_ram(smollm2_dir, adapters, tmp_path, monkeypatch):
    import hf_ftkit.merge.run as run

    monkeypatch.setattr(run, "available_ram", lambda: 1)
    result = merge_adapters(smollm2_dir, [adapters["task_a"]], tmp_path / "m", dtype="bf16", streaming=True)
    assert result.verification["mode"] == "layers" and result.verification["passed"]
    assert result.verification["max_abs_logit_diff"] < 2e-2


def test_resized_vocabulary_is_carried_into_the_merge(smollm2_dir, tmp_path):
    """An adapter trained after adding tokens: its saved embedding replaces the base's, vocab_size follows."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                      init_lora_weights=False))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    param.mul_(0.05)
        peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    result = merge_adapters(smollm2_dir, [tmp_path / "adapter"], out, dtype="fp32", streaming=True)
    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"] + 8
    assert result.config_updates == {"tie_word_embeddings": False, "vocab_size": vocab}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab
    merged = written(out)
    assert merged["model.embed_tokens.weight"].shape[0] == vocab == merged["lm_head.weight"].shape[0]
    assert result.verification["passed"] and result.verification["max_abs_logit_diff"] < 1e-3
    ids = torch.tensor([[1, 2, vocab - 1, vocab - 3]])  # new tokens included
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resized = AutoModelForCausalLM.from_pretrained(smollm2_dir)
        resized.resize_token_embeddings(vocab)
        expected = PeftModel.from_pretrained(resized, tmp_path / "adapter")(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.allclose(got, expected, atol=1e-3)
