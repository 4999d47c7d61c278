"""The real-model helpers: the tokenizer and config alone, read from the GGUF file, are the converted model's."""

from __future__ import annotations

import json

import pytest

from hf_ftkit.testing import smollm2_tokenizer_path


@pytest.mark.slow
def test_the_tokenizer_alone_equals_the_converted_models(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    alone = smollm2_tokenizer_path(tmp_path / "smollm2")  # no model built there: the tokenizer alone
    assert alone == tmp_path / "smollm2-tokenizer" and not (alone / "model.safetensors").exists()
    ours, theirs = AutoTokenizer.from_pretrained(alone), AutoTokenizer.from_pretrained(smollm2_dir)
    chat = [{"role": "user", "content": "Naïve café, 2026-12-03?"}, {"role": "assistant", "content": "Oui."}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat) and len(ours) == len(theirs) == 49152
    # its config is the converted model's, so the demo recipe plans the same from either (tests/recipes/conftest.py)
    assert json.loads((alone / "config.json").read_text()) == json.loads((smollm2_dir / "config.json").read_text())
    assert smollm2_tokenizer_path(smollm2_dir) == smollm2_dir  # a built model serves its own tokenizer
    assert smollm2_tokenizer_path(tmp_path / "smollm2") == alone  # built once
