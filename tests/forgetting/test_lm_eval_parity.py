"""hf-ftkit's per-document log-likelihood equals lm-evaluation-harness's ``loglikelihood_rolling`` (its own
code, run side by side) when lm-eval gets ``max_length=<window>`` and ``add_bos_token=False``; lm-eval's default
of leaving BOS to the tokenizer scores a BOS-adding tokenizer's BOS as part of the document, and differs."""

from __future__ import annotations

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is in the test extra")  # noqa: F841

WINDOW = 64


@pytest.fixture(scope="module")
def documents(heldout_texts) -> list[str]:
    return [t for t in heldout_texts if 2000 < len(t) < 5000][:3]


def ours(model_dir, texts: list[str]) -> list[float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ftkit.forgetting.evaluator import ForgettingEvaluator
    from hf_ftkit.forgetting.heldout import Document

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for text in texts:
        evaluator = ForgettingEvaluator([Document(text)], tokenizer, window=WINDOW, max_tokens=None,
                                        batch_tokens=1024)
        measured = evaluator.measure(model, 0, baseline=True)
        out.append(-measured.values["nll_per_token"] * measured.tokens)
    return out


def theirs(model_dir, texts: list[str], **kwargs) -> list[float]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model_dir), max_length=WINDOW, batch_size=1, device="cpu", dtype="float32", **kwargs)
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]
    return [float(x) for x in lm.loglikelihood_rolling(requests)]


def test_equal_to_lm_eval_with_max_length_and_no_bos(tiny_model_dir, documents):
    reference = theirs(tiny_model_dir, documents, add_bos_token=False)
    assert ours(tiny_model_dir, documents) == pytest.approx(reference, rel=1e-5)  # lm-eval's fp32 log-softmax


def test_lm_eval_scores_a_tokenizer_added_bos_as_part_of_the_document(tiny_model_dir, documents):
    with_bos = theirs(tiny_model_dir, documents, add_bos_token=True)
    assert all(abs(a - b) > 1e-3 * abs(b) for a, b in zip(with_bos, ours(tiny_model_dir, documents), strict=True))
