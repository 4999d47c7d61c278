"""``measure_forgetting``: the forgetting metrics of a finished model (full or adapter) next to its base's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_ftkit.errors import BadInputError
from hf_ftkit.forgetting.evaluator import ForgettingEvaluator, default_window
from hf_ftkit.forgetting.heldout import load_texts, sample_documents

REPORTED = ("bits_per_byte", "byte_perplexity", "word_perplexity", "token_perplexity")


def measure_forgetting(base: str | Path, tuned: str | Path, data: Any, *, max_tokens: int = 32768,
                       window: int | None = None, batch_tokens: int = 4096, column: str | None = None,
                       seed: int = 0, trust_remote_code: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Held-out metrics of ``base`` and ``tuned`` (a model directory or a PEFT adapter directory), KL and
    greedy agreement between them. An adapter is compared with its base through ``disable_adapter()``; a
    full model with the base loaded beside it (exact KL). ``window`` defaults to lm-eval's choice, the model's
    maximum length (capped when one window's logits would not fit in memory; the report says so). Custom
    modelling code never runs unless ``trust_remote_code``; pickle-only checkpoints load only with
    ``allow_pickle``.

    Example:
        >>> report = measure_forgetting("./SmolLM2-135M-Instruct", "./out/adapter", "docs/")
        >>> report["kl"], report["top1_agreement"]
    """
    from hf_ftkit._models import check_model_dir, load_causal_lm, load_tokenizer

    safety = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    base = check_model_dir(base, "--base", **safety)
    tuned_path = check_model_dir(tuned, "--model", **safety)
    texts = load_texts(data, column=column)
    is_adapter = (tuned_path / "adapter_config.json").is_file()
    tokenizer_dir = tuned_path if (tuned_path / "tokenizer_config.json").is_file() else base
    remote = {"trust_remote_code": trust_remote_code}
    tokenizer = load_tokenizer(tokenizer_dir, "--model" if tokenizer_dir == tuned_path else "--base", **remote)
    base_model = load_causal_lm(base, "--base", **remote)
    note = None
    if window is None:
        window, note = default_window(base_model.config)
    evaluator = ForgettingEvaluator(sample_documents(texts, max_bytes=max_tokens * 8, seed=seed), tokenizer,
                                    window=window, max_tokens=max_tokens, batch_tokens=batch_tokens)
    if is_adapter:
        from peft import PeftModel

        try:
            tuned_model = PeftModel.from_pretrained(base_model, tuned_path)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise BadInputError(f"--model {tuned_path} is not an adapter of --base {base} ({str(exc)[:200]}); "
                                "pass the base it was trained on.") from None
        after = evaluator.measure(tuned_model, 1)
    elif Path(tuned_path).resolve() == Path(base).resolve():  # the base against itself: one copy, one pass
        after = evaluator.measure(base_model, 1, baseline=True)
        after.base_values = dict(after.values)
    else:
        model = load_causal_lm(tuned_path, "--model", **remote)
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
        "truncated_documents": after.truncated_documents,  # cut to stay within max_tokens
        "window": window,
        "window_note": note,
        "adapter": is_adapter,
    }
