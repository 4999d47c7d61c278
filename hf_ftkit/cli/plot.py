"""Stacked-bar plot of plan breakdowns (matplotlib, imported only when asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.estimate import COMPONENTS, Plan
from hf_ftkit.units import GIB

if TYPE_CHECKING:
    from hf_ftkit.compare.methods import Comparison


def plot_plans(plans: dict[str, Plan], path: str | Path, title: str) -> Path:
    """Write a PNG with one stacked bar per labelled plan; the budget is a dashed line."""
    plt, out = _pyplot(path)
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
    return _save(plt, fig, out)


def _pyplot(path: str | Path) -> tuple[Any, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    if not out.parent.exists():
        raise BadInputError(f"--plot {path}: folder {out.parent} does not exist; create it or choose another path.")
    if out.is_dir():
        raise BadInputError(f"--plot {path} is a directory; pass a file name such as {out / 'plan.png'}.")
    return plt, out


def _save(plt: Any, fig: Any, out: Path) -> Path:
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BadInputError(f"--plot {out}: cannot write there ({exc.strerror or exc}); choose another path.") \
            from None
    finally:
        plt.close(fig)
    return out


def plot_comparison(result: Comparison, path: str | Path) -> Path:
    """Write a PNG of ``hf-ftkit compare``: fewest GPUs, GPU-hours and cost (or size on disk) per method."""
    plt, out = _pyplot(path)
    rows = list(result.rows.values())
    labels = [row.method for row in rows]
    panels: list[tuple[str, list[float]]] = [
        (f"fewest {result.gpu['id']} GPUs", [row.placement.gpus if row.placement else 0 for row in rows]),
        ("GPU-hours (estimated)", [row.gpu_hours or 0 for row in rows]),
    ]
    if result.price_per_gpu_hour is not None:
        panels.append(("cost (estimated)", [row.cost or 0 for row in rows]))
    else:
        panels.append(("size on disk (GiB)", [row.artifact_bytes / GIB for row in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (name, values) in zip(axes, panels, strict=True):
        bars = ax.bar(labels, values, color=["#c44e52", "#4c72b0", "#55a868", "#8172b2"][: len(labels)])
        ax.bar_label(bars, labels=[f"{v:,.3g}" if v else "n/a" for v in values], fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"{result.model.model_id}, {result.tokens:,} tokens", fontsize=10)
    return _save(plt, fig, out)
