"""``max_tokens`` caps what is tokenized and scored, a long last document included, and says so."""

from __future__ import annotations

import time

import pytest

from hf_ftkit.forgetting.heldout import Document
from hf_ftkit.forgetting.windows import encode


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


def test_the_model_against_itself_loads_one_copy_and_runs_one_pass(tiny_model_dir, tmp_path, heldout_texts,
                                                                     monkeypatch):
    import hf_ftkit._models as models
    from hf_ftkit.forgetting.compare import measure_forgetting
    from hf_ftkit.forgetting.evaluator import ForgettingEvaluator

    loads, passes = [], []
    real_load, real_measure = models.load_causal_lm, ForgettingEvaluator.measure
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(ForgettingEvaluator, "measure",
                        lambda self, *a, **k: passes.append(a) or real_measure(self, *a, **k))
    report = measure_forgetting(tiny_model_dir, tiny_model_dir, heldout_texts, max_tokens=512)
    assert len(loads) == 1 and len(passes) == 1
    assert report["kl"] == 0 and report["delta_pct"]["bits_per_byte"] == 0
    assert report["window"] == 512  # the tiny model's max_position_embeddings, as lm-eval would use


def test_default_window_is_the_models_maximum_capped_by_logit_memory():
    from transformers import AutoConfig

    from hf_ftkit.forgetting.evaluator import MAX_WINDOW_LOGIT_BYTES, default_window

    assert default_window(AutoConfig.for_model("gpt2")) == (1024, None)  # n_positions
    assert default_window(AutoConfig.for_model("llama", max_position_embeddings=8192, vocab_size=49152)) == (8192,
                                                                                                              None)
    window, note = default_window(AutoConfig.for_model("llama", max_position_embeddings=131072, vocab_size=128256))
    assert window * 128256 * 4 <= MAX_WINDOW_LOGIT_BYTES < (window + 1) * 128256 * 4
    assert note is not None and "131072" in note
