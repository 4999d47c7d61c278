"""``hf-ftkit env``: versions, torch build, GPUs and the bitsandbytes backend, for bug reports."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from hf_ftkit.units import format_bytes

if TYPE_CHECKING:
    from rich.console import Console


def add_parser(sub: Any) -> None:
    p = sub.add_parser("env", help="Library versions, torch build and GPUs (paste into bug reports).",
                       description="Library versions, torch build, GPUs and their memory, bitsandbytes backend.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from hf_ftkit.environment import collect

    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="hf-ftkit environment", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("hf-ftkit", facts["hf_ftkit"])
    table.add_row("python", f"{facts['python']} on {facts['platform']}")
    table.add_row("CPU / RAM", f"{facts['cpu_count']} cores, {format_bytes(facts['ram_bytes'] or 0)}")
    build = facts["torch_build"]
    accel = f"CUDA {build['cuda']}" if build["cuda"] else f"ROCm {build['hip']}" if build["hip"] else "CPU-only"
    table.add_row("torch build", f"{build['version']} ({accel})")
    for name, version in facts["libraries"].items():
        table.add_row(name, version or "not installed")
    gpus = facts["gpus"] or [{"name": "none", "memory_bytes": 0, "capability": "-"}]
    for i, gpu in enumerate(gpus):
        table.add_row(f"GPU {i}", f"{gpu['name']} ({format_bytes(gpu['memory_bytes'])}, sm {gpu['capability']})")
    table.add_row("bitsandbytes backend", facts["bitsandbytes_backend"] or "not installed")
    console.print(table)
    return 0
