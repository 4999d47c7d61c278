"""``hf-ftkit merge`` and ``hf-ftkit adapters inspect``: thin parsers over ``hf_ftkit.merge``."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from hf_ftkit._progress import byte_progress
from hf_ftkit.errors import BadInputError
from hf_ftkit.units import format_bytes, parse_size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

MERGE_EXAMPLES = """examples:
  hf-ftkit merge ./SmolLM2-135M-Instruct ./adapter --out ./merged --dtype bf16
  hf-ftkit merge ./Llama-3.1-70B ./adapter --out ./merged --streaming
  hf-ftkit merge ./base ./a ./b --weights 0.7 0.3 --adapter-only --out ./a_plus_b
  hf-ftkit merge ./base ./a ./b --method ties_svd --density 0.5 --out ./merged --json
  hf-ftkit merge ./Llama-3.1-8B ./qlora-adapter --qlora dequantized --out ./merged

methods: exact (default; the exact weighted sum, via cat), cat (same), and PEFT's approximate
linear, svd, ties, ties_svd, dare_linear, dare_linear_svd, dare_ties, dare_ties_svd,
magnitude_prune, magnitude_prune_svd (report their error against the exact sum).
exit codes: 0 written, 1 verification failed (nothing written), 2 bad input (nothing written).
"""
INSPECT_EXAMPLES = """examples:
  hf-ftkit adapters inspect ./adapter
  hf-ftkit adapters inspect ./tenant_a ./tenant_b --base ./Llama-3.1-8B --for vllm
  hf-ftkit adapters inspect ./adapter --json
exit codes: 0 compatible, 1 a blocking finding, 2 bad input.
"""


def _size(text: str) -> int:
    try:
        return int(parse_size(text))
    except BadInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: Any) -> None:
    from hf_ftkit.merge.methods import METHODS

    p = sub.add_parser(
        "merge", help="Compose LoRA adapters and merge them into the base (in memory or streaming).",
        description="Compose adapters, merge into the base, verify the result, write it all-or-nothing.",
        epilog=MERGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("base", help="base model directory (or a hub id already in the Hugging Face cache)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT LoRA adapter directories")
    p.add_argument("--out", required=True, help="output directory (written only when complete and verified)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    p.add_argument("--method", choices=tuple(METHODS), default="exact")
    p.add_argument("--density", type=float, help="kept fraction for ties/dare/magnitude_prune methods")
    p.add_argument("--svd-rank", type=int, help="rank of the _svd methods' result (default: largest input rank)")
    p.add_argument("--adapter-only", action="store_true", help="write the composed adapter, not a merged model")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="output dtype (default: the base's)")
    p.add_argument("--streaming", action="store_true",
                   help="merge tensor by tensor: peak RAM ~ largest tensor + adapter, for models larger than RAM")
    p.add_argument("--qlora", choices=("dequantized", "original"),
                   help="the adapter was trained on a 4-bit base: merge into dequant(quant(W)) (matches training) "
                        "or into the original 16-bit W; both are reported against the 4-bit model")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="the QLoRA base's 4-bit type")
    p.add_argument("--double-quant", action="store_true", help="the QLoRA base used double quantization")
    p.add_argument("--qlora-dtype", choices=("bf16", "fp16", "fp32"),
                   help="dtype the QLoRA base was loaded in before quantization (default: the base checkpoint's "
                        "own dtype, as dtype='auto' loads it)")
    p.add_argument("--no-verify", action="store_true", help="skip running merged vs base + adapter")
    p.add_argument("--prompt", action="append", help="verification prompt (repeatable; default: three built-in)")
    p.add_argument("--tolerance", type=float, help="largest accepted max |Δlogit| (default depends on --dtype)")
    p.add_argument("--max-shard-size", type=_size, default=5 * 10**9, help="output shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once verified)")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin (pickle) weights you trust")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_merge)

    adapters = sub.add_parser("adapters", help="Inspect LoRA adapters.", description="Inspect LoRA adapters.")
    verbs = adapters.add_subparsers(dest="verb", metavar="VERB", parser_class=type(p))
    i = verbs.add_parser(
        "inspect", help="Facts, compatibility and serving checks for adapters.", epilog=INSPECT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Base, type, rank, alpha, scaling, targets, size; a verdict on composing the set; "
                    "and what a serving engine needs.",
    )
    i.add_argument("adapters", nargs="+", metavar="DIR")
    i.add_argument("--base", help="check shapes against this base model directory")
    i.add_argument("--for", dest="serving", choices=("vllm", "tgi"), help="check what this engine serves")
    i.add_argument("--allow-pickle", action="store_true", help="read .bin (pickle) adapters you trust")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=run_inspect)


def run_merge(args: argparse.Namespace, console: Console) -> int:
    from hf_ftkit._dtypes import to_torch
    from hf_ftkit.merge.config import MergeConfig
    from hf_ftkit.merge.run import merge_adapters
    from hf_ftkit.merge.streaming import QloraTarget

    qlora = None
    if args.qlora:
        from hf_ftkit.merge.run import stored_dtype

        load_dtype = to_torch(args.qlora_dtype) if args.qlora_dtype else stored_dtype(args.base)
        qlora = QloraTarget(args.qlora, args.quant_type, args.double_quant, load_dtype)
    config = MergeConfig(
        weights=args.weights, method=args.method, density=args.density, svd_rank=args.svd_rank,
        adapter_only=args.adapter_only, dtype=args.dtype, streaming=args.streaming, qlora=qlora,
        verify=not args.no_verify, prompts=args.prompt, tolerance=args.tolerance, overwrite=args.overwrite,
        allow_pickle=args.allow_pickle, max_shard_bytes=args.max_shard_size,
    )
    with byte_progress("merging") as progress:
        result = merge_adapters(args.base, args.adapters, args.out, config, progress=progress)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        console.print(_merge_table(result.to_dict()))
    return 0


def _merge_table(data: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(title=f"hf-ftkit merge → {data['out']} ({data['mode']})", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    comp = data["composition"]
    kind = "exact weighted sum" if comp["exact"] else "approximate"
    table.add_row("composition", f"{comp['method']} ({kind}), rank {comp['rank']}, weights {comp['weights']}")
    table.add_row("ΔW vs Σ wᵢ·ΔWᵢ", f"max relative Frobenius error {comp['max_relative_error']:.2e} "
                                   f"over {len(comp['layer_errors'])} layers")
    check = data.get("verification")
    if check:
        verdict = "[green]passed[/]" if check["passed"] else "[red]failed[/]"
        table.add_row("verification", f"{verdict} ({check['mode']}): max |Δlogit| {check['max_abs_logit_diff']:.3g} "
                                      f"(tolerance {check['tolerance']:.3g}), top-1 agreement "
                                      f"{check['top1_agreement']:.1%}")
    qlora = data.get("qlora")
    if qlora:
        table.add_row("QLoRA target", f"{qlora['target']} (the dequantized target matches training)")
        table.add_row("vs 4-bit training model", f"merged {qlora['merged_vs_training']:.3g}; original-base target "
                                                 f"{qlora['original_target_vs_training']:.3g} (max |Δlogit|)")
    for key, value in data.get("config_updates", {}).items():
        table.add_row("config", f"{key} = {value}")
    table.add_row("time", f"{data['seconds']:.1f} s")
    return table


def run_inspect(args: argparse.Namespace, console: Console) -> int:
    from hf_ftkit.merge.inspect import inspect_adapters

    report = inspect_adapters(args.adapters, base=args.base, serving=args.serving, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.table import Table

        table = Table(title="LoRA adapters")
        for column in ("adapter", "base", "r", "alpha", "scaling", "DoRA", "targets", "modules_to_save", "params",
                       "size"):
            table.add_column(column)
        for a in report.adapters:
            scaling = f"{a.scaling:.4g}" + (" (rsLoRA)" if a.use_rslora else "")
            targets = a.target_modules if isinstance(a.target_modules, str) else f"{a.targeted_modules} modules"
            table.add_row(a.path, str(a.base_model), "/".join(map(str, a.ranks)) or str(a.r), f"{a.lora_alpha:g}",
                          scaling, "yes" if a.use_dora else "no", targets, ",".join(a.modules_to_save) or "-",
                          f"{a.trainable_params:,}", format_bytes(a.size_on_disk))
        console.print(table)
        for finding in report.findings:
            style = {"error": "red", "warning": "yellow", "info": "dim"}[finding.level]
            console.print(f"[{style}]{finding.level}[/]: {finding.message}")
        verdict = "[green]compatible[/]" if report.compatible else "[red]not compatible[/]"
        console.print(f"verdict: {verdict}")
        if report.serving:
            console.print(f"serve with: {report.serving['command']}")
    return 0 if report.compatible else 1
