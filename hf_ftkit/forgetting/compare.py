"""``measure_forgetting``: the forgetting metrics of a finished model (full or adapter) next to its base's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_ftkit.errors import BadInputError
from hf_ftkit.forgetting.evaluator import ForgettingEvaluator
from hf_ftkit.forgetting.heldout import load_texts, sample_documents

REPORTED = ("bits_per_byte", "byte_perplexity", "word_perplexity", "token_perplexity")


def measure_forgetting(base: str | Path, tuned: str | Path, data: Any, *, max_tokens: int = 32768,
                   window: int = 2048, batch_tokens: int = 4096, column: str | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Held-out metrics of ``base`` and ``tuned`` (a model directory or a PEFT adapter directory), KL and
    greedy agreement between them. An adapter is compared with its base through ``disable_adapter()``; a
    full model with the base loaded beside it (exact KL).

    Example:
        >>> report = measure_forgetting("./SmolLM2-135M-Instruct", "./out/adapter", "docs/")
        >>> report["kl"], report["top1_agreement"]
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = load_texts(data, column=column)
    tuned_path = Path(tuned)
    is_adapter = (tuned_path / "adapter_config.json").is_file()
    tokenizer_dir = tuned_path if (tuned_path / "tokenizer_config.json").is_file() else Path(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        base_model = AutoModelForCausalLM.from_pretrained(base)
    except OSError as exc:
        raise BadInputError(f"cannot load the base model {base} ({exc}); pass a model directory.") from None
    evaluator = ForgettingEvaluator(sample_documents(texts, max_bytes=max_tokens * 8, seed=seed), tokenizer,
                                    window=window, max_tokens=max_tokens, batch_tokens=batch_tokens)
    if is_adapter:
        from peft import PeftModel

        after = evaluator.measure(PeftModel.from_pretrained(base_model, tuned_path), 1)
    else:
        model = AutoModelForCausalLM.from_pretrained(tuned_path)
        if model.config.vocab_size != base_model.config.vocab_size:
            raise BadInputError("the tuned model's vocabulary differs from the base's; KL needs the same tokens.")
        after = evaluator.measure(model, 1, reference=base_model)
    before = after.base_values  # the base's metrics come from the same pass as the KL's base logits
    assert before is not None
    return {
        "base": {k: before[k] for k in REPORTED},
        "tuned": {k: after.values[k] for k in REPORTED},
        "delta_pct": {k: 100 * (after.values[k] - before[k]) / before[k]  # type: ignore[operator]
                      for k in REPORTED},
        "kl": after.values["kl"],
        "top1_agreement": after.values["top1_agreement"],
        "tokens": after.tokens,
        "documents": after.documents,
        "adapter": is_adapter,
    }
