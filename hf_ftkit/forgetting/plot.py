"""The end-of-training picture: task loss and forgetting over steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(history: list[dict[str, Any]], log_history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    figure, task = plt.subplots(figsize=(7, 4))
    if loss:
        task.plot(*zip(*loss, strict=True), color="tab:blue", label="task loss")
    task.set_xlabel("step")
    task.set_ylabel("task loss", color="tab:blue")
    held = task.twinx()
    points = [(e["step"], e.get("bits_per_byte_delta_pct")) for e in history]
    held.plot(*zip(*points, strict=True), "o-", color="tab:red", label="held-out bits/byte change")
    held.set_ylabel("held-out bits per byte, % change from baseline", color="tab:red")
    kl = [(e["step"], e["kl"]) for e in history if e.get("kl") is not None]
    if kl:
        third = task.twinx()
        third.spines["right"].set_position(("axes", 1.15))
        third.plot(*zip(*kl, strict=True), "s--", color="tab:green")
        third.set_ylabel("KL(base ‖ tuned) per token", color="tab:green")
    task.set_title("Task loss and forgetting")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
