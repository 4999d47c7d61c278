"""``ForgettingCallback``: measure what fine-tuning costs on held-out text, during training, and act on it."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from transformers import TrainerCallback

from hf_ftkit import _stop
from hf_ftkit._files import write_text_atomic
from hf_ftkit.errors import BadInputError, HfFtkitWarning
from hf_ftkit.forgetting.evaluator import ForgettingEvaluator, Measurement, default_window
from hf_ftkit.forgetting.heldout import load_texts, overlapping, sample_documents
from hf_ftkit.forgetting.metrics import METRICS, BaseCache, MeasurementCancelled

PREFIX = "forgetting/"
KNOWN_THRESHOLDS = (*METRICS, *(f"{m}_delta" for m in METRICS[:5]), *(f"{m}_delta_pct" for m in METRICS[:5]))
BYTES_PER_TOKEN = 4  # sampling reads about this much text per token before tokenizing
OVERLAP_SAMPLE = 5000  # training examples checked for held-out overlap
STATE_FILE = "hf_ftkit_forgetting.json"  # in each checkpoint: the history a resumed run continues
BASE_CACHE_FILE = "hf_ftkit_forgetting_base{rank}.safetensors"  # full FT: the base's top-k, for KL after resume


class ForgettingCallback(TrainerCallback):
    """Measures held-out bits per byte, perplexities and KL to the base during a Trainer/SFTTrainer run.

    A baseline is measured before step 0; then at every evaluation (``every="eval"``) or every N steps.
    Values go through the Trainer's logging as ``forgetting/<metric>`` and ``forgetting/<metric>_delta_pct``
    (TensorBoard, W&B and ``state.log_history`` receive them) and into ``<output_dir>/forgetting.json``; a
    plot of task loss and forgetting is written at the end. A failing check warns and switches itself off
    unless ``strict=True``.

    Each checkpoint keeps the history (and, for full fine-tuning, the base's top-k distribution), so a run
    resumed from it continues against the step-0 baseline instead of measuring a new one. While a preemption
    signal is pending (``hf-ftkit train``'s SIGTERM handling) no measurement runs, and one in progress stops
    between batches, so the checkpoint is saved first.

    Args:
        heldout: texts, a file, a directory or a dataset spec (see ``load_texts``).
        max_tokens: held-out tokens per measurement (documents are whole; sampled with ``seed``).
        every: ``"eval"`` or a number of steps.
        threshold: ``{metric: limit}``, e.g. ``{"bits_per_byte_delta_pct": 5}`` or ``{"kl": 0.1}``.
        action: ``"warn"`` (once) or ``"stop"`` (save a checkpoint and end training) when a limit is passed.
        window: rolling-window length in tokens; default: the model's maximum length, as lm-eval uses (capped
            when one window's logits would not fit in memory).
        batch_tokens: tokens per forward pass.
        top_k: base tokens kept per position for full fine-tuning's KL.

    Example:
        >>> from hf_ftkit.forgetting import ForgettingCallback, stdlib_documents
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=lora,
        ...                      callbacks=[ForgettingCallback(stdlib_documents(), every=50,
        ...                                                    threshold={"bits_per_byte_delta_pct": 5})])
    """

    def __init__(self, heldout: Any, *, max_tokens: int = 32768, every: int | Literal["eval"] = "eval",
                 threshold: dict[str, float] | None = None, action: Literal["warn", "stop"] = "warn",
                 column: str | None = None, seed: int = 0, window: int | None = None, batch_tokens: int = 4096,
                 top_k: int = 64, strict: bool = False, check_overlap: bool = True) -> None:
        unknown = [k for k in (threshold or {}) if k not in KNOWN_THRESHOLDS]
        if unknown:
            raise BadInputError(
                f"threshold on unknown metric {unknown[0]!r}; use one of: {', '.join(KNOWN_THRESHOLDS)}."
            )
        if action not in ("warn", "stop"):
            raise BadInputError(f"unknown action {action!r}; use 'warn' or 'stop'.")
        if every != "eval" and (not isinstance(every, int) or every < 1):
            raise BadInputError(f"every={every!r}: pass 'eval' or a positive number of steps.")
        self.texts = load_texts(heldout, column=column)
        if not self.texts:
            raise BadInputError("the held-out data is empty; pass documents of real text.")
        self.max_tokens, self.every, self.threshold, self.action = max_tokens, every, dict(threshold or {}), action
        self.seed, self.window, self.batch_tokens, self.top_k = seed, window, batch_tokens, top_k
        self.strict, self.check_overlap = strict, check_overlap
        # internal state, apart from the user's settings
        self.evaluator: ForgettingEvaluator | None = None
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.crossed: dict[str, Any] | None = None
        self.seconds_measuring = 0.0
        self._handler: Any = None
        self._window: int | None = window  # the window in use (the model's maximum when ``window`` is None)
        self._disabled = False
        self._warned = False

    # -- events -------------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._handler is None:
            # Passed as callbacks=[...]: no public hook hands a callback its handler, which is the caller of
            # this event (hf_ftkit.add_callbacks binds it instead; tests cover both).
            self._handler = sys._getframe(1).f_locals.get("self")
        tokenizer = kwargs.get("processing_class") or kwargs.get("tokenizer")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        try:
            self._prepare(model, tokenizer, kwargs.get("train_dataloader"))
            assert self.evaluator is not None
            if state.global_step > 0 and self._restore(args, state):
                return  # resumed: the step-0 baseline and the history go on
            if state.global_step > 0:
                warnings.warn(f"resumed at step {state.global_step} from a checkpoint without hf-ftkit's "
                              "forgetting history: the baseline is measured on the resumed model.",
                              HfFtkitWarning, stacklevel=2)
            started = time.perf_counter()
            baseline = self.evaluator.measure(model, state.global_step, autocast_dtype=_autocast(args), baseline=True)
            self.seconds_measuring += time.perf_counter() - started
            self._record(baseline, args, state, control, baseline=True)
        except (BadInputError, FloatingPointError, ValueError) as exc:
            self._fail(exc)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # The final measurement runs at the last step rather than in on_train_end, where reporting callbacks
        # (TensorBoard, W&B) have already closed their writers; on_train_end still catches other early stops.
        if _stop.requested():
            return  # preempted: the checkpoint first, no measurement
        last = state.global_step >= state.max_steps > 0 or control.should_training_stop
        if last or (isinstance(self.every, int) and state.global_step % self.every == 0):
            self._measure(args, state, control, model)

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.every == "eval":
            self._measure(args, state, control, model)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not self.history or not folder.is_dir():
            return
        if state.is_world_process_zero:
            saved = {"history": self.history, "best": self.best, "crossed": self.crossed, "warned": self._warned,
                     "seconds_measuring": self.seconds_measuring}
            write_text_atomic(folder / STATE_FILE, json.dumps(saved, indent=2) + "\n")
        if self.evaluator is not None and self.evaluator.cache is not None:  # each rank scores its own documents
            from safetensors.torch import save_file

            cache = self.evaluator.cache
            tensors = {f"{kind}.{i}": t[j].contiguous() for i, t in enumerate(cache.batches)
                       for j, kind in enumerate(("logprobs", "indices"))}
            save_file(tensors, str(folder / _base_cache_file()), metadata={"k": str(cache.k)})

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not _stop.requested():
            self._measure(args, state, control, model)  # the final numbers (skipped if this step was measured)
        if self.history and state.is_world_process_zero:
            self._write(args.output_dir)
            from hf_ftkit.forgetting.plot import plot_history

            plot_history(self.history, state.log_history, Path(args.output_dir) / "forgetting.png")

    def bind_handler(self, handler: Any) -> None:
        """The Trainer's ``CallbackHandler``, through which measurements reach the reporting callbacks
        (``hf_ftkit.add_callbacks`` calls this)."""
        self._handler = handler

    # -- internals ----------------------------------------------------------------------------------------
    def _prepare(self, model: Any, tokenizer: Any, train_dataloader: Any) -> None:
        if tokenizer is None:
            raise BadInputError("ForgettingCallback needs the tokenizer: pass processing_class= to the Trainer.")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise BadInputError(
                f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab}: they do not belong "
                "together; pass the model's own tokenizer."
            )
        documents = sample_documents(self.texts, max_bytes=self.max_tokens * BYTES_PER_TOKEN * 2, seed=self.seed)
        self._window = self.window
        if self._window is None:
            self._window, note = default_window(model.config)
            if note:
                warnings.warn(f"ForgettingCallback: {note}.", HfFtkitWarning, stacklevel=3)
        self.evaluator = ForgettingEvaluator(documents, tokenizer, window=self._window, max_tokens=self.max_tokens,
                                             batch_tokens=self.batch_tokens, top_k=self.top_k)
        if self.check_overlap and train_dataloader is not None:
            texts = _training_texts(getattr(train_dataloader, "dataset", None), tokenizer)
            shared = overlapping(self.evaluator.encoded.documents, texts) if texts else 0
            if shared:
                warnings.warn(f"{shared} held-out documents share 13-word passages with the training data; "
                              "forgetting measured on them is optimistic: hold out other text.",
                              HfFtkitWarning, stacklevel=2)

    def _restore(self, args: Any, state: Any) -> bool:
        """Continue the history kept in the checkpoint being resumed; False when there is none."""
        assert self.evaluator is not None
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            saved = json.loads((folder / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        history = [e for e in saved.get("history", []) if e.get("step", 0) <= state.global_step]
        baseline = next((e for e in history if e.get("baseline")), None)
        if baseline is None:
            return False
        self.history, self.best, self.crossed = history, saved.get("best"), saved.get("crossed")
        self._warned = bool(saved.get("warned"))
        self.seconds_measuring = float(saved.get("seconds_measuring", 0.0))
        self.evaluator.baseline = {k: baseline.get(k) for k in METRICS}
        if (folder / _base_cache_file()).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / _base_cache_file()), framework="pt") as f:
                cache = BaseCache(int((f.metadata() or {}).get("k", self.top_k)))
                count = len([k for k in f.keys() if k.startswith("logprobs.")])
                cache.batches = [(f.get_tensor(f"logprobs.{i}"), f.get_tensor(f"indices.{i}")) for i in range(count)]
            self.evaluator.cache = cache
        return True

    def _measure(self, args: Any, state: Any, control: Any, model: Any) -> None:
        if self._disabled or self.evaluator is None or _stop.requested():
            return
        if self.history and self.history[-1]["step"] == state.global_step:
            return  # measured at this step already (an evaluation right after a scheduled measurement)
        started = time.perf_counter()
        try:
            measurement = self.evaluator.measure(model, state.global_step, autocast_dtype=_autocast(args),
                                                 cancel=_cancel_check())
        except MeasurementCancelled:
            return  # a preemption signal arrived mid-measurement: the checkpoint goes first
        except (FloatingPointError, ValueError) as exc:
            self._fail(exc)
            return
        self.seconds_measuring += time.perf_counter() - started
        self._record(measurement, args, state, control)

    def _record(self, measurement: Measurement, args: Any, state: Any, control: Any, baseline: bool = False) -> None:
        values = {f"{PREFIX}{k}": round(v, 6) for k, v in measurement.flat().items() if v is not None}
        values[f"{PREFIX}tokens"] = measurement.tokens
        task_loss = _latest_loss(state.log_history)
        entry = {"step": measurement.step, "baseline": baseline, **measurement.flat(),
                 "tokens": measurement.tokens, "documents": measurement.documents,
                 "truncated_documents": measurement.truncated_documents, "window": self._window,
                 "task_loss": task_loss}
        self.history.append(entry)
        state.log_history.append({**values, "step": state.global_step})
        if self._handler is not None:  # through the Trainer's reporting callbacks, like Trainer.log does
            for callback in self._handler.callbacks:
                if callback is not self:
                    callback.on_log(args, state, control, logs=dict(values))
        if not baseline:
            self._act(entry, args, state, control)
        if state.is_world_process_zero:
            self._write(args.output_dir)

    def _act(self, entry: dict[str, Any], args: Any, state: Any, control: Any) -> None:
        passed = {k: entry.get(k) for k, limit in self.threshold.items()
                  if entry.get(k) is not None and entry[k] > limit}
        if not passed:
            loss = entry.get("task_loss")
            if loss is not None and (self.best is None or loss < self.best["task_loss"]):
                # the lowest task loss among measurements within every limit; its checkpoint exists when the
                # run saved at that step (align save_steps with `every`)
                self.best = {"step": entry["step"], "task_loss": loss,
                             "checkpoint": str(Path(args.output_dir) / f"checkpoint-{entry['step']}")}
            return
        if self.crossed is None:
            self.crossed = {"step": entry["step"], "metrics": passed}
        detail = ", ".join(f"{k} = {v:.4g} > {self.threshold[k]:g}" for k, v in passed.items())
        if self.action == "stop":
            control.should_save = True
            control.should_training_stop = True
            warnings.warn(f"forgetting limit passed at step {entry['step']} ({detail}); saving a checkpoint and "
                          "stopping.", HfFtkitWarning, stacklevel=2)
        elif not self._warned:
            self._warned = True
            warnings.warn(f"forgetting limit passed at step {entry['step']} ({detail}).", HfFtkitWarning,
                          stacklevel=2)

    def _fail(self, exc: Exception) -> None:
        if self.strict:
            raise exc
        self._disabled = True
        warnings.warn(f"ForgettingCallback switched off: {exc}", HfFtkitWarning, stacklevel=3)

    def _write(self, output_dir: str) -> None:
        path = Path(output_dir)
        path.mkdir(parents=True, exist_ok=True)
        best = dict(self.best) if self.best else None
        if best is not None and not Path(best["checkpoint"]).is_dir():
            best["checkpoint"] = None
        report = {"history": self.history, "best": best, "threshold": self.threshold,
                  "crossed": self.crossed, "action": self.action, "seconds_measuring": self.seconds_measuring}
        write_text_atomic(path / "forgetting.json", json.dumps(report, indent=2) + "\n")


def _base_cache_file() -> str:
    """This rank's file of the base's top-k (ranks score different documents); no suffix when not distributed."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return BASE_CACHE_FILE.format(rank=f".rank{dist.get_rank()}" if distributed else "")


def _cancel_check() -> Any:
    """Stop a measurement between batches on preemption; single-process only, since ranks stopping at
    different batches would leave the others waiting in a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return None
    return _stop.requested


def _autocast(args: Any) -> Any:
    import torch

    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


def _latest_loss(log_history: list[dict[str, Any]]) -> float | None:
    for entry in reversed(log_history):
        for key in ("eval_loss", "loss"):
            if key in entry:
                return float(entry[key])
    return None


def _training_texts(dataset: Any, tokenizer: Any) -> list[str]:
    """Up to OVERLAP_SAMPLE training examples as text: a text column, or the decoded input_ids."""
    if dataset is None or not hasattr(dataset, "__len__"):
        return []
    count = min(len(dataset), OVERLAP_SAMPLE)
    names = getattr(dataset, "column_names", None) or []
    if "text" in names:
        return [str(t) for t in dataset[:count]["text"]]
    if "input_ids" in names:
        return tokenizer.batch_decode(dataset[:count]["input_ids"], skip_special_tokens=True)
    return []
