from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def heldout_texts() -> list[str]:
    """Real English from the Python standard library's module docstrings (offline everywhere)."""
    from hf_ftkit.forgetting.heldout import stdlib_documents

    return stdlib_documents()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
