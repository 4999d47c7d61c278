"""``ForgettingEvaluator``: held-out data prepared once, measured against a baseline whenever asked.

Used by ``ForgettingCallback`` during training and by ``hf-ftkit forgetting`` for finished models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hf_ftkit.errors import BadInputError
from hf_ftkit.forgetting.heldout import MIN_TOKENS, Document
from hf_ftkit.forgetting.metrics import (
    BaseCache,
    EncodedSet,
    HiddenCache,
    Logits,
    Reference,
    all_reduce,
    batches_in_step,
    measure,
)
from hf_ftkit.forgetting.windows import encode


@dataclass
class Measurement:
    """Metrics at one step, absolute and as change from the baseline."""

    step: int
    values: dict[str, float | None]
    baseline: dict[str, float | None]
    tokens: int
    documents: int
    base_values: dict[str, float | None] | None = None  # the base's metrics, where this pass computed them
    truncated_documents: int = 0  # held-out documents cut to stay within max_tokens

    def deltas(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for key, value in self.values.items():
            base = self.baseline.get(key)
            if value is None or base is None or key in ("kl", "top1_agreement"):
                continue
            out[f"{key}_delta"] = value - base
            out[f"{key}_delta_pct"] = 100.0 * (value - base) / base if base else None
        return out

    def flat(self) -> dict[str, float | None]:
        return {**self.values, **self.deltas()}


LM_EVAL_DEFAULT_WINDOW = 2048  # lm-eval's HFLM max_length when the model's config names none
MAX_WINDOW_LOGIT_BYTES = 2 * 2**30  # one window's float32 logits stay under this; longer contexts are capped
_LENGTH_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's HFLM.max_length looks these up


def default_window(config: Any) -> tuple[int, str | None]:
    """The rolling window lm-eval would use for this model (its maximum length), and a note when it was capped
    because one window's logits (tokens × vocabulary × 4 bytes) would pass ``MAX_WINDOW_LOGIT_BYTES``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = next((int(v) for k in _LENGTH_KEYS if isinstance(v := getattr(text, k, None), int) and v > 0),
                  LM_EVAL_DEFAULT_WINDOW)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    cap = max(256, MAX_WINDOW_LOGIT_BYTES // (4 * vocab)) if vocab else length
    if length <= cap:
        return length, None
    return cap, (f"window capped at {cap} tokens (the model's maximum is {length}: one window's logits would need "
                 f"{length * vocab * 4 / 2**30:.0f} GiB); pass window/--window to choose")


def is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class ForgettingEvaluator:
    """Tokenizes the held-out documents for ``tokenizer`` and measures models on them.

    Args:
        documents: the held-out sample (see ``heldout.sample_documents``).
        tokenizer: the model's tokenizer.
        window: rolling-window length in tokens (lm-eval uses the model's maximum length).
        max_tokens: stop adding documents past this many tokens.
        batch_tokens: tokens per forward pass (bounds the logits' memory).
        top_k: tokens of the base distribution kept per position when the base cannot be recomputed.
    """

    def __init__(self, documents: list[Document], tokenizer: Any, *, window: int = 2048, max_tokens: int = 32768,
                 batch_tokens: int = 4096, top_k: int = 64) -> None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.encoded: EncodedSet = encode(documents, tokenizer, window=window, batch_tokens=batch_tokens,
                                          max_tokens=max_tokens, rank=rank, world=world)
        total = self.encoded if world == 1 else encode(documents, tokenizer, window=window,
                                                       batch_tokens=batch_tokens, max_tokens=max_tokens)
        if total.tokens < MIN_TOKENS:
            raise BadInputError(
                f"the held-out data has {total.tokens} tokens; at least {MIN_TOKENS} are needed for a meaningful "
                "measurement, so pass more text."
            )
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.top_k = top_k
        self.cache: BaseCache | None = None
        self.hidden: HiddenCache | None = None  # PEFT: the frozen base's hidden states, see HiddenCache
        self._hidden_of = 0  # id() of the model they belong to
        self.baseline: dict[str, float | None] = {}

    def measure(self, model: Any, step: int, *, autocast_dtype: torch.dtype | None = None,
                baseline: bool = False, reference: Any = None, cancel: Any = None) -> Measurement:
        """Evaluate ``model`` (eval mode, inference mode, RNG untouched, mode restored afterwards).

        KL is taken against ``reference`` (a loaded base model) when given; else PEFT models are compared
        with their own base through ``disable_adapter()`` and other models with the top-k distribution
        captured at the baseline. ``cancel()`` turning true between batches raises ``MeasurementCancelled``.
        """
        peft = reference is None and is_peft(model)
        untouched = peft and adapter_is_identity(model)  # a fresh adapter is the base: one pass, KL 0
        if baseline or (self.hidden is not None and self._hidden_of != id(model)):
            self.hidden = None
        rng = _rng_state()
        was_training = model.training
        model.eval()
        try:
            forward, ref = self._plan(model, peft=peft, untouched=untouched, baseline=baseline, reference=reference)
            sums = all_reduce(measure(model, self.encoded, pad_token=self.pad, forward=forward, reference=ref,
                                      autocast_dtype=autocast_dtype, cancel=cancel,
                                      extra_batches=batches_in_step(self.encoded)))
        finally:
            model.train(was_training)
            _restore_rng(rng)
        if ref.capture is not None:
            self.cache = ref.capture
        if ref.capture_hidden is not None and ref.capture_hidden.valid:
            self.hidden, self._hidden_of = ref.capture_hidden, id(model)
        values = sums.metrics()
        if (baseline and not peft and reference is None) or untouched:
            values["kl"], values["top1_agreement"] = 0.0, 1.0  # the model is its own reference
        if any(v is not None and not math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"held-out metrics are not finite at step {step}: {values}")
        if baseline:
            self.baseline = dict(values)
        base_values = dict(values) if untouched else sums.base_metrics()
        return Measurement(step, values, dict(self.baseline), sums.tokens, sums.documents, base_values,
                           self.encoded.truncated)

    def _plan(self, model: Any, *, peft: bool, untouched: bool, baseline: bool,
              reference: Any) -> tuple[Logits | None, Reference]:
        """How to get the measured logits and the base's: the fewest forward passes that give exact KL."""
        if reference is not None:
            return None, Reference(forward=lambda ids, mask: reference(input_ids=ids, attention_mask=mask).logits)
        if not peft:
            return None, Reference(capture=BaseCache(self.top_k)) if baseline else Reference(cache=self.cache)

        def base_forward(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            with model.disable_adapter():
                return model(input_ids=ids, attention_mask=mask).logits

        head = model.get_output_embeddings()

        def base_head(hidden: torch.Tensor) -> torch.Tensor:
            with model.disable_adapter():
                return head(hidden)

        capture = self.hidden is None and head is not None and frozen_base(model)
        ref = Reference(head=base_head if head is not None else None,
                        capture_hidden=HiddenCache() if capture else None, head_module=head)
        if untouched:  # the adapter adds exactly zero: run the base alone, which skips the adapter's matmuls
            return base_forward, ref
        if self.hidden is not None:
            ref.hidden = self.hidden
        else:
            ref.forward = base_forward
        return None, ref


def frozen_base(model: Any) -> bool:
    """True when only adapter weights train and no weight is sharded, so the base's hidden states can be
    cached once and its output head applied to them later."""
    from torch.distributed.tensor import DTensor

    prefix = getattr(getattr(model, "base_model", None), "prefix", "lora_")
    for name, param in model.named_parameters():
        if isinstance(param, DTensor) or hasattr(param, "ds_id"):  # FSDP2 / DeepSpeed ZeRO-3 shards
            return False
        if param.requires_grad and not any(tag in name for tag in (prefix, "modules_to_save", "trainable_tokens")):
            return False
    return not any("FullyShardedDataParallel" in type(module).__name__ for module in model.modules())


def adapter_is_identity(model: Any) -> bool:
    """True when every LoRA B matrix is zero (PEFT's default initialisation) and nothing else trains
    (no DoRA magnitude, no modules_to_save copy)."""
    found = False
    for name, param in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            found = True
            if bool(param.detach().any()):
                return False
        elif param.requires_grad and "lora_A" not in name and "lora_embedding_A" not in name:
            return False
    return found


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
