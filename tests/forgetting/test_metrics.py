"""Metric definitions against an independent computation on the real SmolLM2-135M."""

from __future__ import annotations

import math
import re

import pytest
import torch

from hf_ftkit.errors import BadInputError
from hf_ftkit.forgetting.evaluator import ForgettingEvaluator
from hf_ftkit.forgetting.heldout import Document
from hf_ftkit.forgetting.windows import rolling_windows

WINDOW = 64  # small, so documents span several windows and end in a partial one


def independent_nll(model, tokenizer, text: str, window: int) -> tuple[float, int]:
    """Token by token: each token's window, and the context lm-eval's disjoint rolling windows give it."""
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total, n = 0.0, len(tokens)
    for w in range(math.ceil(n / window)):
        end = min((w + 1) * window, n)
        if w == 0:
            inputs, first = [prefix, *tokens[: end - 1]], 0
        else:
            inputs = tokens[end - window - 1: end - 1]
            first = len(inputs) - (end - w * window)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inputs])).logits[0].double(), -1)
        for position in range(first, len(inputs)):
            target = tokens[end - len(inputs) + position] if w else tokens[position]
            total -= float(logp[position, target])
    return total, n


@pytest.mark.slow
def test_bits_per_byte_and_word_perplexity_match_an_independent_computation(smollm2_dir, smollm2_tokenizer,
                                                                             heldout_texts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    texts = [t[:900] for t in heldout_texts[:4]]  # a few documents of different lengths
    evaluator = ForgettingEvaluator([Document(t) for t in texts], smollm2_tokenizer, window=WINDOW,
                                    max_tokens=10_000, batch_tokens=WINDOW)
    got = evaluator.measure(model, 0, baseline=True)
    nll = tokens = 0.0
    for text in texts:
        doc_nll, doc_tokens = independent_nll(model, smollm2_tokenizer, text, WINDOW)
        nll, tokens = nll + doc_nll, tokens + doc_tokens
    byte_count = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    assert got.tokens == tokens
    assert got.values["bits_per_byte"] == pytest.approx(nll / byte_count / math.log(2), rel=1e-6)
    assert got.values["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-6)
    assert got.values["byte_perplexity"] == pytest.approx(math.exp(nll / byte_count), rel=1e-6)
    assert got.values["token_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)


def test_rolling_windows_follow_lm_eval():
    tokens = list(range(10, 20))  # 10 tokens, window 4 -> predicts 4 + 4 + 2
    windows = rolling_windows(tokens, prefix_token=0, window=4)
    assert [w.predicted for w in windows] == [4, 4, 2]
    assert windows[0].input_ids == [0, 10, 11, 12] and windows[0].labels == [10, 11, 12, 13]
    assert windows[1].input_ids == [13, 14, 15, 16] and windows[1].labels == [14, 15, 16, 17]
    # the last, partial window keeps a full window of context and predicts only the new tokens
    assert windows[2].input_ids == [15, 16, 17, 18] and windows[2].labels[-2:] == [18, 19]
    assert rolling_windows([], 0, 4) == []


def test_batches_keep_to_the_token_budget_and_similar_lengths(smollm2_tokenizer, heldout_texts):
    from hf_ftkit.forgetting.windows import SAME_LENGTH, encode

    encoded = encode([Document(t) for t in heldout_texts[:40]], smollm2_tokenizer, window=512, batch_tokens=2048)
    lengths = [[len(encoded.windows[i].input_ids) for i in batch] for batch in encoded.batches]
    assert sorted(i for batch in encoded.batches for i in batch) == list(range(len(encoded.windows)))
    assert len(lengths) > 1 and all(len(b) * max(b) <= 2048 or len(b) == 1 for b in lengths)
    assert all(min(b) >= SAME_LENGTH * max(b) for b in lengths)
    assert sum(len(b) * max(b) for b in lengths) <= 1.05 * sum(map(sum, lengths))  # padding stays small


def test_too_little_held_out_text_is_bad_input(smollm2_tokenizer):
    with pytest.raises(BadInputError, match="at least 256 are needed"):
        ForgettingEvaluator([Document("Too short to measure.")], smollm2_tokenizer)
