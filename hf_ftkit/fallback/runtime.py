"""Runtime fallback: when a real out-of-memory error ends a run, step down the ladder and go on.

A step whose checkpoint the next rung can load resumes from the last checkpoint with optimizer and
scheduler state: a smaller micro-batch, more accumulation, checkpointing on, or a method whose
checkpoint holds the same thing (the method table's ``resume_keeps``: a LoRA run goes on as QLoRA
with its adapter and optimizer states, the base re-loaded in 4 bits). A step that changes what the
checkpoint holds (full weights to an adapter, LoRA to DoRA), the optimizer, the precision or the
adapter's shape restarts training under the new setup in a fresh sub-directory, so no saved
checkpoint is ever deleted or overwritten. Non-OOM exceptions propagate untouched.
"""

from __future__ import annotations

import gc
import json
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_ftkit.fallback.ladder import Rung, Setup
from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs

_OOM_MARKERS = (
    "out of memory",  # CUDA and HIP RuntimeErrors
    "cublas_status_alloc_failed",
    "can't allocate memory",  # the CPU allocator
    "cannot allocate memory",
)
# Settings whose change invalidates a checkpoint's weights or optimizer state (beyond what the method's
# checkpoint holds; the 4-bit settings only shape the frozen base, which an adapter checkpoint does not hold).
_RESUME_KEYS = ("optim", "precision", "lora_r", "lora_targets", "modules_to_save")


def is_oom(exc: BaseException) -> bool:
    """True for a real out-of-memory error from torch, CUDA/HIP, cuBLAS or the CPU allocator."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def can_resume(before: PlanInputs, after: PlanInputs) -> bool:
    """A checkpoint of ``before`` can continue under ``after``: both methods' checkpoints hold the same
    state (the method table's ``resume_keeps``) and only the batch shape, checkpointing or the base's
    quantization changed."""
    if before.info.resume_keeps != after.info.resume_keeps:
        return False
    keys = _RESUME_KEYS if before.is_peft else ("optim", "precision")  # full FT has no adapter settings
    return all(getattr(before, k) == getattr(after, k) for k in keys)


@dataclass
class FallbackEvent:
    """One fallback: where it happened, the error, and the setups before and after."""

    step: int
    error: str
    before: dict[str, Any]
    after: dict[str, Any]
    action: str  # "resume" from the last checkpoint, or "restart" under a new method
    resumed_from: str | None = None


@dataclass
class RunSummary:
    """What a run with fallback did; ``to_json`` is the run-summary file's content."""

    completed: bool
    final: dict[str, Any]
    output_dir: str
    fallbacks: list[FallbackEvent] = field(default_factory=list)
    error: str | None = None  # why the run ended without completing (the ladder was exhausted)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _release_memory() -> None:
    """Collect what the failed run left and give cached device memory back."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def _later_rungs(setup: Setup, current: PlanInputs) -> list[Rung]:
    configs = [r.inputs for r in setup.ladder]
    index = configs.index(current) if current in configs else -1
    return setup.ladder[index + 1:]


def train_with_fallback(
    make_trainer: Callable[[Setup, Path], Any],
    setup: Setup,
    output_dir: str | Path,
    *,
    max_fallbacks: int = 3,
    summary_file: str | None = "run_summary.json",
    resume_from_checkpoint: str | None = None,
) -> RunSummary:
    """Train with ``make_trainer(setup, output_dir)``; on a real OOM, step down the ladder and go on.

    Args:
        make_trainer: builds a ready ``Trainer``/``SFTTrainer`` for a setup, writing to the given folder
            (typically: ``setup.load_model()``, ``TrainingArguments(output_dir=..., **setup.training_overrides())``).
        setup: the starting setup, usually from :func:`~hf_ftkit.choose_setup` (its ladder gives the next rungs).
        output_dir: where checkpoints go; a restart under a new method uses ``<output_dir>/fallback-<n>-<method>``.
        max_fallbacks: give up (re-raising the last OOM) after this many fallbacks.
        summary_file: name of the JSON summary written into ``output_dir`` (None: do not write).
        resume_from_checkpoint: a checkpoint of this run to continue the first attempt from.

    Example:
        >>> setup = hf_ftkit.choose_setup("meta-llama/Llama-3.1-8B", "24GiB")
        >>> summary = train_with_fallback(my_trainer_factory, setup, "out")
    """
    root = Path(output_dir)
    current, folder = setup, root
    events: list[FallbackEvent] = []
    resume = resume_from_checkpoint
    while True:
        trainer = make_trainer(current, folder)
        try:
            trainer.train(resume_from_checkpoint=resume)
            break
        except Exception as exc:
            remaining = _later_rungs(setup, current.inputs)
            if not is_oom(exc) or len(events) >= max_fallbacks or not remaining:
                if summary_file and is_oom(exc):  # the ladder is exhausted: what was tried, and where it saved
                    error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    _write_summary(root / summary_file, RunSummary(completed=False, final=current.chosen_dict(),
                                                                   output_dir=str(folder), fallbacks=events,
                                                                   error=error))
                raise
            step = int(getattr(trainer.state, "global_step", 0))
            error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        # outside the except block, so the traceback's frames (and the tensors they hold) are gone
        del trainer
        _release_memory()
        rung = remaining[0]
        after = Setup(model=setup.model, plan=estimate(setup.model, rung.inputs, setup.budget_bytes),
                      name=rung.name, budget_bytes=setup.budget_bytes, ladder=setup.ladder)
        if can_resume(current.inputs, after.inputs):
            resume, action = _last_checkpoint(folder), "resume"
        else:
            folder = root / f"fallback-{len(events) + 1}-{after.inputs.method}"
            resume, action = None, "restart"
        events.append(FallbackEvent(step=step, error=error, before=current.chosen_dict(),
                                    after=after.chosen_dict(), action=action, resumed_from=resume))
        current = after
    summary = RunSummary(completed=True, final=current.chosen_dict(), output_dir=str(folder), fallbacks=events)
    if summary_file:
        _write_summary(root / summary_file, summary)
    return summary


def _write_summary(path: Path, summary: RunSummary) -> None:
    from hf_ftkit._files import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, summary.to_json() + "\n")

