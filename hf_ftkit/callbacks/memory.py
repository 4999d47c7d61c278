"""``MemoryBudgetCallback``: plan the run at its start, log measured vs planned peak memory."""

from __future__ import annotations

import resource
import sys
import warnings
from typing import Any

from transformers import TrainerCallback

from hf_ftkit.errors import DoesNotFitError, HfFtkitError, HfFtkitWarning
from hf_ftkit.planner.estimate import Plan
from hf_ftkit.units import GIB


def measured_peak_bytes() -> tuple[int, str]:
    """Peak memory of this process so far: CUDA max allocated, else the process's peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


class MemoryBudgetCallback(TrainerCallback):
    """Plans the actual run before the first step and logs measured vs planned peak memory.

    Logs ``memory/peak_gib``, ``memory/planned_gib`` and ``memory/plan_error_pct`` (plus
    ``memory/peak_max_gib`` across ranks when distributed) at every logging step, so TensorBoard
    and W&B show them with no extra code. Training on the CPU, the process's peak RSS is logged as
    ``memory/cpu_peak_rss_gib`` instead, with no error against the plan: the plan is of GPU memory
    (allocated bytes), which an RSS (libraries, the Python heap, the dataset) does not measure. Reads the
    device's allocator statistics only, once per logging step: no synchronisation is added to training steps.

    Args:
        budget: per-device budget (``"24GiB"``, a GPU name, ``"auto"``, bytes); optional.
        plan: a ready plan; by default one is made from the model, args and PEFT/quantization config.
        seq_len: tokens per sequence for the plan when the args do not say (``SFTConfig.max_length`` does).
        strict: raise :class:`~hf_ftkit.DoesNotFitError` at train begin when the plan does not fit
            (default: warn).
        warn_fraction: warn once when the measured peak passes this fraction of the budget.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds,
        ...                   callbacks=[MemoryBudgetCallback(budget="24GiB")])
    """

    def __init__(self, budget: str | int | None = None, plan: Plan | None = None, seq_len: int | None = None,
                 strict: bool = False, warn_fraction: float = 0.95) -> None:
        self.budget = budget
        self.seq_len = seq_len
        self.strict = strict
        self.warn_fraction = warn_fraction
        self.plan = plan
        self._warned_peak = False
        self._placed = False  # True once hf_ftkit.add_callbacks put it ahead of the reporting callbacks

    def bind_handler(self, handler: Any) -> None:
        """Called by ``hf_ftkit.add_callbacks``, which already placed this callback first."""
        self._placed = True

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not self._placed:
            _move_to_front(self)  # passed as callbacks=[...]: see _move_to_front
        if self.plan is None and model is not None:
            self.plan = self._plan_run(model, args)
        if self.plan is not None and self.plan.fits is False:
            message = (f"the planned peak of {self.plan.peak_bytes / GIB:.2f} GiB per device exceeds the budget of "
                       f"{(self.plan.budget_bytes or 0) / GIB:.2f} GiB; see `hf-ftkit plan` for what to change.")
            if self.strict:
                raise DoesNotFitError(message)
            warnings.warn(message, HfFtkitWarning, stacklevel=2)

    def _plan_run(self, model: Any, args: Any) -> Plan | None:
        from hf_ftkit.planner.from_objects import plan_from_training

        peft = getattr(model, "peft_config", None)
        lora = next(iter(peft.values())) if isinstance(peft, dict) and peft else None
        bnb = getattr(getattr(model, "config", None), "quantization_config", None)
        if bnb is not None and not hasattr(bnb, "load_in_4bit"):
            from transformers import BitsAndBytesConfig

            bnb = BitsAndBytesConfig.from_dict(dict(bnb)) if isinstance(bnb, dict) else None
        try:
            return plan_from_training(model, args, lora, bnb, seq_len=self.seq_len, budget=self.budget)
        except HfFtkitError as exc:
            if self.strict:
                raise
            warnings.warn(f"memory plan skipped: {exc}", HfFtkitWarning, stacklevel=2)
            return None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        peak, source = measured_peak_bytes()
        on_cpu = source == "cpu_peak_rss"
        values = {"memory/cpu_peak_rss_gib" if on_cpu else "memory/peak_gib": round(peak / GIB, 4)}
        maximum = _max_over_ranks(peak)
        if maximum is not None:
            values["memory/cpu_peak_rss_max_gib" if on_cpu else "memory/peak_max_gib"] = round(maximum / GIB, 4)
        if self.plan is not None:
            planned = self.plan.allocated_peak_bytes
            values["memory/planned_gib"] = round(planned / GIB, 4)
            if not on_cpu:
                values["memory/plan_error_pct"] = round(100.0 * (planned - peak) / max(peak, 1), 2)
            budget = self.plan.budget_bytes
            if budget and not on_cpu and peak > self.warn_fraction * budget and not self._warned_peak:
                self._warned_peak = True
                warnings.warn(f"measured peak {peak / GIB:.2f} GiB passed {self.warn_fraction:.0%} of the "
                              f"{budget / GIB:.2f} GiB budget.", HfFtkitWarning, stacklevel=2)
        if logs is not None:
            logs.update(values)
        # Trainer appended a copy of ``logs`` to the history just before calling us
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def _move_to_front(callback: Any) -> None:
    """Run before the reporting callbacks, so TensorBoard/W&B receive the memory keys.

    Trainer puts ``callbacks=[...]`` after its ``report_to`` integrations, and no hook hands a
    callback its handler: the handler is the caller of this event. Moving an element that is
    being visited to the front keeps every later element at its index, so the event in progress
    still reaches each callback once.
    """
    frame = sys._getframe(2)
    handler = frame.f_locals.get("self")
    callbacks = getattr(handler, "callbacks", None)
    if isinstance(callbacks, list) and callback in callbacks and callbacks[0] is not callback:
        callbacks.remove(callback)
        callbacks.insert(0, callback)


def _max_over_ranks(peak: int) -> int | None:
    """One all-reduce per logging step when running distributed; None otherwise."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([peak], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())
