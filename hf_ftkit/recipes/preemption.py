"""Preemption: SIGTERM or SIGINT during training saves a checkpoint at the current step and ends the run."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers import TrainerCallback

from hf_ftkit import _stop


class PreemptionCallback(TrainerCallback):
    """Turns a termination signal into "save a checkpoint now and stop" at the next step's end.

    Every rank stops at the same step: under DDP/FSDP the flag is all-reduced (one scalar per step), so
    a signal that reached only some ranks, or reached them at different steps, cannot split the run.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.stopped_at: int | None = None

    def request(self, name: str) -> None:
        self.signal_name = self.signal_name or name
        _stop.request(name)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        requested = self.signal_name is not None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            flag = torch.tensor([1.0 if requested else 0.0])
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
            if requested and self.signal_name is None:
                self.request("another rank's signal")
        if requested:
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # the checkpoint first: an evaluation could outlast the grace period
            self.stopped_at = state.global_step


@contextmanager
def preemption_signals(callback: PreemptionCallback) -> Iterator[None]:
    """While training: the first SIGTERM/SIGINT asks for a checkpoint and a clean stop; a second SIGINT
    interrupts at once (KeyboardInterrupt)."""
    previous: dict[signal.Signals, Any] = {}

    def handler(number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        if callback.signal_name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        callback.request(name)

    _stop.clear()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _stop.clear()
