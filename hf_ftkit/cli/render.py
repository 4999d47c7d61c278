"""Rich rendering of plans for the terminal (the library itself never prints)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from hf_ftkit.planner.estimate import COMPONENTS, Plan
from hf_ftkit.planner.suggest import FitRow, Suggestion
from hf_ftkit.units import format_bytes

_LABELS = {
    "weights": "weights",
    "adapter_weights": "adapter weights (fp32)",
    "quant_constants": "quantization constants",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "logits_loss": "logits / loss",
    "transient": "transient (casts, optimizer step)",
    "sharding_buffers": "sharding / DDP buffers",
    "fragmentation": "allocator slack (reserved − allocated)",
    "comm_buffers": "NCCL buffers (fixed, multi-GPU)",
    "cuda_context": "CUDA context (fixed)",
}
# shown even at zero; NCCL's line only on more than one GPU
_ALWAYS_SHOWN = ("weights", "activations", "fragmentation", "cuda_context")


def _describe(plan: Plan) -> str:
    i = plan.inputs
    parts = [
        f"{plan.model.model_id} ({plan.model.params_total / 1e9:.2f}B params)",
        f"method {i.method}" + (f" r={i.lora_r}" if i.is_peft else ""),
        f"{i.precision}",
        f"optim {i.optim}",
        f"batch {i.batch_size} x seq {i.seq_len}",
        "GC on" if i.gradient_checkpointing else "GC off",
    ]
    if i.world_size > 1:
        count = f"{i.nodes} nodes x {i.gpus} GPUs" if i.nodes > 1 else f"{i.gpus} GPUs"  # as recipes: nodes first
        parts.append(f"{count}, {i.shard}" + (f", offload {i.offload}" if i.offload != "none" else ""))
    return " · ".join(parts)


def plan_table(plan: Plan) -> Table:
    table = Table(title=_describe(plan), title_justify="left", show_footer=False)
    table.add_column("component")
    table.add_column("per device", justify="right")
    for key in COMPONENTS:
        value = plan.breakdown.get(key, 0)
        if value or key in _ALWAYS_SHOWN:
            table.add_row(_LABELS[key], format_bytes(value))
    table.add_section()
    table.add_row("allocated peak (max_memory_allocated)", format_bytes(plan.allocated_peak_bytes))
    table.add_row("reserved peak (max_memory_reserved)", format_bytes(plan.reserved_peak_bytes))
    table.add_row(f"[bold]peak per device[/] ({plan.peak_phase}; reserved + context)",
                  f"[bold]{format_bytes(plan.peak_bytes)}[/]")
    if plan.budget_bytes is not None:
        table.add_row(f"budget ({plan.budget_label})", format_bytes(plan.budget_bytes))
        colour = "green" if plan.fits else "red"
        verdict = "fits" if plan.fits else "does NOT fit"
        table.add_row(f"[{colour}]headroom — {verdict}[/]", f"[{colour}]{format_bytes(plan.headroom_bytes or 0)}[/]")
    trainable = plan.trainable_params
    table.caption = f"trainable parameters: {trainable:,} ({100 * trainable / plan.model.params_total:.3f}%)"
    return table


def suggestions_table(suggestions: list[Suggestion]) -> Table:
    table = Table(title="What would lower the peak", title_justify="left")
    table.add_column("change")
    table.add_column("saves", justify="right")
    table.add_column("new peak", justify="right")
    table.add_column("fits", justify="center")
    for s in suggestions:
        fits = "" if s.fits is None else ("[green]yes[/]" if s.fits else "[red]no[/]")
        table.add_row(s.label, f"−{format_bytes(s.saves_bytes)}", format_bytes(s.peak_bytes), fits)
    return table


def fits_table(rows: list[FitRow], budget_label: str, seq_len: int, batch_size: int) -> Table:
    table = Table(title=f"What fits in {budget_label}", title_justify="left")
    table.add_column("method")
    table.add_column("GC")
    table.add_column(f"max micro-batch @ seq {seq_len}", justify="right")
    table.add_column(f"max seq len @ batch {batch_size}", justify="right")
    for r in rows:
        table.add_row(r.method, "on" if r.gradient_checkpointing else "off",
                      str(r.max_batch_size) if r.max_batch_size else "[red]none[/]",
                      str(r.max_seq_len) if r.max_seq_len else "[red]none[/]")
    return table


def ladder_table(setup: Any) -> Table:
    table = Table(title=f"Fallback ladder for {format_bytes(setup.budget_bytes)} per device", title_justify="left")
    table.add_column("rung")
    table.add_column("peak", justify="right")
    table.add_column("verdict")
    for rung in setup.ladder:
        chosen = rung.name == setup.name
        name = f"[bold green]→ {rung.name}[/]" if chosen else rung.name
        colour = "green" if rung.fits else "red"
        table.add_row(name, format_bytes(rung.peak_bytes), f"[{colour}]{rung.reason}[/]")
    return table


def print_plan(console: Console, plan: Plan, suggestions: list[Suggestion]) -> None:
    console.print(plan_table(plan))
    if suggestions and (plan.fits is False or plan.budget_bytes is None):
        console.print(suggestions_table(suggestions))
