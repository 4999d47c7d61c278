"""``hf-ftkit compare``: full FT, LoRA, DoRA and QLoRA side by side for one model, GPU, data size and price."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

from hf_ftkit.cli.fields import add_input_flags, input_values, positive_int
from hf_ftkit.compare.methods import Comparison, MethodRow, compare_methods, gpu_memory_bytes
from hf_ftkit.errors import BadInputError
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.units import format_bytes, format_count, parse_count

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

EXAMPLES = """examples:
  hf-ftkit compare meta-llama/Llama-3.1-8B --gpu h100 --tokens 50M --price-per-gpu-hour 2.5
  hf-ftkit compare meta-llama/Llama-3.1-70B --gpu rtx4090 --tokens 200M --json
  hf-ftkit compare Qwen/Qwen2.5-7B --gpu a100-80gb --seq-len 4096 --batch-size 4 --plot compare.png
  hf-ftkit compare ./base --gpu l4 --forgetting lora=forgetting.json
"""


# The run settings compare takes from PlanInputs (flags generated from the dataclass, as plan's are).
COMPARED_FIELDS = ["batch_size", "seq_len", "optim", "precision", "lora_r", "lora_targets"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "compare", help="Full FT vs LoRA vs DoRA vs QLoRA: memory, GPUs, time, cost, size, risk.",
        description="Side-by-side table of full fine-tuning, LoRA, DoRA and QLoRA for one model on one kind of GPU: "
                    "parameters updated, peak memory per GPU, the fewest GPUs that fit (and the sharding), "
                    "training time and cost for a token count, size on disk, deployment and forgetting risk.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub id, checkpoint directory or config.json path")
    p.add_argument("--gpu", default="h100", help="GPU kind from the built-in table (default %(default)s)")
    p.add_argument("--tokens", default="50M", help="training tokens, all epochs (50M, 1.5B, ...; default %(default)s)")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="price of one GPU-hour, e.g. 2.5")
    add_input_flags(p, COMPARED_FIELDS[:2], overrides={"batch_size": {"help": "micro-batch per GPU"}})
    p.add_argument("--utilization", type=float, default=0.4,
                   help="fraction of the GPU's bf16 peak that training reaches (default %(default)s)")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="auto: only where it lowers the GPU count (default)")
    add_input_flags(p, COMPARED_FIELDS[2:])
    p.add_argument("--max-gpus", type=positive_int, default=512, help="most GPUs tried (default %(default)s)")
    p.add_argument("--gpus-per-node", type=positive_int, default=8)
    p.add_argument("--forgetting", action="append", default=[], metavar="METHOD=REPORT",
                   help="a measured `hf-ftkit forgetting --json` report for a method (repeatable)")
    p.add_argument("--online", action="store_true", help="fetch config.json from the hub if not found offline")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="FILE", help="PNG: GPUs needed, GPU-hours and cost per method")
    p.set_defaults(func=run)
    return p


def _forgetting_reports(items: list[str]) -> dict[str, str]:
    reports = {}
    for item in items:
        method, sep, path = item.partition("=")
        if not sep or not method or not path:
            raise BadInputError(f"--forgetting {item!r} must look like lora=report.json.")
        reports[method.strip()] = path.strip()
    return reports


def run(args: argparse.Namespace, console: Console) -> int:
    inputs = PlanInputs(**input_values(args, COMPARED_FIELDS))
    result = compare_methods(
        args.model, gpu=args.gpu, tokens=parse_count(args.tokens, what="--tokens"),
        price_per_gpu_hour=args.price_per_gpu_hour, inputs=inputs, utilization=args.utilization,
        checkpointing=args.gradient_checkpointing, max_gpus=args.max_gpus, gpus_per_node=args.gpus_per_node,
        forgetting=_forgetting_reports(args.forgetting), allow_online=args.online,
    )
    if args.plot:
        from hf_ftkit.cli.plot import plot_comparison

        plot_comparison(result, args.plot)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = max(console.width, 150)  # piped into a file or a log: keep the table's rows unfolded
    console.print(comparison_table(result))
    console.print("Assumptions:")
    for number, line in enumerate(result.assumptions, 1):
        console.print(f"  {number}. {line}", soft_wrap=True)
    return 0


def _gpus(row: MethodRow, gpu_id: str, max_gpus: int) -> str:
    p = row.placement
    if p is None:
        return f"[red]does not fit on {max_gpus}x {gpu_id}[/]"
    nodes = f" = {p.nodes} nodes" if p.nodes > 1 else ""
    how = [] if p.shard == "none" else [{"fsdp": "FSDP", "zero3": "ZeRO-3"}[p.shard]]
    how += ["grad ckpt"] if p.gradient_checkpointing else []
    return f"{p.gpus}x {gpu_id}{nodes}" + (f" ({', '.join(how)})" if how else "")


def _hours(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f} h" if value >= 1 else f"{value * 60:.0f} min"


def comparison_rows(result: Comparison) -> tuple[list[str], list[tuple[str, list[str], str]]]:
    """Column headers and ``(row name, one cell per method, basis)`` rows, shared by the table and Markdown."""
    from hf_ftkit.planner.methods import method_info

    rows = list(result.rows.values())
    gpu_id = result.gpu["id"]
    memory = format_bytes(gpu_memory_bytes(result.gpu))
    price = result.price_per_gpu_hour
    lines: list[tuple[str, list[str], str]] = [
        ("params updated", [f"{format_count(r.trainable_params)} ({r.trainable_pct:.3g}%)" for r in rows], "planned"),
        ("fewest GPUs", [_gpus(r, gpu_id, result.max_gpus) for r in rows], "planned"),
        (f"peak per GPU (of {memory})",
         [format_bytes(r.placement.plan.peak_bytes) if r.placement else "-" for r in rows], "planned"),
        ("FLOPs per token", [f"{r.flops.total / 1e9:,.1f} G" for r in rows], "estimated"),
        ("training time", [_hours(r.hours) + (f" ({_hours(r.hours_range[0])}-{_hours(r.hours_range[1])})"
                                               if r.hours_range else "") for r in rows],
         "estimated; DoRA/QLoRA x published slowdown vs LoRA (QDoRA: the two composed)"),
        ("GPU-hours", [f"{r.gpu_hours:,.1f}" if r.gpu_hours is not None else "-" for r in rows], "estimated"),
        ("cost" if price is not None else "cost (needs --price-per-gpu-hour)",
         [f"{r.cost:,.0f}" if r.cost is not None else "-" for r in rows], "estimated"),
        ("size on disk", [format_bytes(r.artifact_bytes) for r in rows], "estimated"),
        ("resumable checkpoint", [format_bytes(r.checkpoint_bytes) for r in rows], "estimated"),
        ("deployment", [r.deployment for r in rows], ""),
        ("composability", [r.composability for r in rows], ""),
        ("forgetting risk", [r.forgetting_risk for r in rows],
         "measured" if any(r.forgetting for r in rows) else "literature"),
    ]
    return [method_info(r.method).label for r in rows], lines


def _title(result: Comparison) -> str:
    return (f"{result.model.model_id} on {result.gpu['name']}: {format_count(result.tokens)} tokens, "
            f"micro-batch {result.inputs.batch_size} x {result.inputs.seq_len}")


def comparison_table(result: Comparison) -> Table:
    """The rich table ``hf-ftkit compare`` prints: one column per method, one basis column."""
    headers, lines = comparison_rows(result)
    from rich.table import Table

    table = Table(title=_title(result))
    table.add_column("")
    for header in headers:
        table.add_column(header, overflow="fold")
    table.add_column("basis", style="dim")
    for name, cells, basis in lines:
        table.add_row(name, *cells, basis)
    return table


def comparison_markdown(result: Comparison) -> str:
    """The same table as Markdown (for docs and reports); rich markup is dropped."""
    import re

    headers, lines = comparison_rows(result)
    out = [f"| | {' | '.join(headers)} | basis |", "|---|" + "---|" * len(headers) + "---|"]
    for name, cells, basis in lines:
        clean = [re.sub(r"\[/?[a-z ]*\]", "", cell).replace("|", "/") for cell in cells]
        out.append(f"| {name} | {' | '.join(clean)} | {basis} |")
    return "\n".join(out) + "\n"
