"""Stacked-bar plot of plan breakdowns (matplotlib, imported only when asked for)."""

from __future__ import annotations

from pathlib import Path

from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.estimate import COMPONENTS, Plan
from hf_ftkit.units import GIB


def plot_plans(plans: dict[str, Plan], path: str | Path, title: str) -> Path:
    """Write a PNG with one stacked bar per labelled plan; the budget is a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    if not out.parent.exists():
        raise BadInputError(f"--plot {path}: folder {out.parent} does not exist; create it or choose another path.")
    fig, ax = plt.subplots(figsize=(1.6 * len(plans) + 3, 5))
    labels = list(plans)
    bottoms = [0.0] * len(labels)
    colours = plt.get_cmap("tab20")(range(20))
    for index, key in enumerate(COMPONENTS):
        values = [plans[label].breakdown.get(key, 0) / GIB for label in labels]
        if any(values):
            ax.bar(labels, values, bottom=bottoms, label=key.replace("_", " "), color=colours[index % 20])
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    budget = next((p.budget_bytes for p in plans.values() if p.budget_bytes), None)
    if budget:
        ax.axhline(budget / GIB, color="black", linestyle="--", linewidth=1, label="budget")
    ax.set_ylabel("GiB per device")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
