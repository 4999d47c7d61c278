"""``max_tokens`` caps what is tokenized and scored, a long last document included, and says so."""

from __future__ import annotations

import time

import pytest

from hf_ftkit.forgetting.heldout import Document
from hf_ftkit.forgetting.metrics import encode


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("budget", [256, 2048])
def test_a_long_document_is_cut_to_the_budget(tokenizer, heldout_texts, budget):
    huge = Document(" ".join(heldout_texts) * 3)  # megabytes of text in one document
    assert len(huge.text) > 300_000
    started = time.perf_counter()
    encoded = encode([huge, Document("never reached")], tokenizer, window=128, batch_tokens=1024, max_tokens=budget)
    assert time.perf_counter() - started < 5  # only the budget's worth of text is tokenized
    assert sum(len(w.labels[-w.predicted:]) for w in encoded.windows) == encoded.tokens == budget
    assert encoded.truncated == 1 and len(encoded.documents) == 1
    kept = encoded.documents[0]
    assert kept.truncated and huge.text.startswith(kept.text)
    # bytes and words are those of the scored text: re-tokenizing it gives the scored tokens
    assert len(tokenizer(kept.text, add_special_tokens=False)["input_ids"]) == pytest.approx(budget, abs=1)


def test_documents_within_the_budget_are_whole(tokenizer, heldout_texts):
    docs = [Document(t) for t in heldout_texts[:3]]
    total = sum(len(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs)
    encoded = encode(docs, tokenizer, window=128, batch_tokens=1024, max_tokens=total)
    assert encoded.tokens == total and encoded.truncated == 0 and encoded.documents == docs


def test_the_cli_reports_the_cut(tiny_model_dir, tmp_path, heldout_texts, capsys):
    import json

    from hf_ftkit.cli.main import main

    (tmp_path / "big.txt").write_text(" ".join(heldout_texts) * 3)
    code = main(["forgetting", "--base", str(tiny_model_dir), "--model", str(tiny_model_dir), "--data",
                 str(tmp_path / "big.txt"), "--max-tokens", "256", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["tokens"] == 256 and report["truncated_documents"] == 1


def test_a_measurement_stops_between_batches_when_cancelled(tiny_model_dir, tokenizer, heldout_texts):
    from transformers import AutoModelForCausalLM

    from hf_ftkit.forgetting.evaluator import ForgettingEvaluator
    from hf_ftkit.forgetting.heldout import sample_documents
    from hf_ftkit.forgetting.metrics import MeasurementCancelled

    evaluator = ForgettingEvaluator(sample_documents(heldout_texts, max_bytes=20000), tokenizer, window=64,
                                    max_tokens=2048, batch_tokens=256)
    assert len(evaluator.encoded.batches) > 2
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2  # a signal arrives while the second batch is scored

    with pytest.raises(MeasurementCancelled):
        evaluator.measure(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 0, baseline=True, cancel=cancel)
    assert len(calls) == 3
