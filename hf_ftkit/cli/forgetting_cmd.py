"""``hf-ftkit forgetting``: held-out metrics of a finished model next to its base's."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from hf_ftkit.cli.fields import positive_int

if TYPE_CHECKING:
    from rich.console import Console

EXAMPLES = """examples:
  hf-ftkit forgetting --base ./SmolLM2-135M-Instruct --model ./out/adapter --data ./heldout/ --json
  hf-ftkit forgetting --base ./base --model ./merged --data stdlib --max-tokens 65536 --window 2048
exit codes: 0 measured, 2 bad input.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "forgetting", help="Held-out bits per byte, perplexities and KL: base vs tuned.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="What fine-tuning cost the model on held-out pretraining-style text (lm-eval wikitext "
                    "definitions), base and tuned side by side.",
    )
    p.add_argument("--base", required=True, help="base model directory (or cached hub id)")
    p.add_argument("--model", required=True, help="tuned model directory or PEFT adapter directory")
    p.add_argument("--data", required=True, help="file, directory, or dataset id[:config][:split]")
    p.add_argument("--max-tokens", type=positive_int, default=32768, help="held-out tokens (default %(default)s)")
    p.add_argument("--window", type=positive_int,
                   help="rolling-window length in tokens (default: the model's maximum length, as lm-eval uses; "
                        "capped when one window's logits would not fit in memory)")
    p.add_argument("--column", help="text column of a jsonl/parquet/dataset (default: detected)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own modelling code (only for authors you trust); never asked")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin (pickle) checkpoints you trust")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from hf_ftkit.forgetting.compare import REPORTED, measure_forgetting

    result = measure_forgetting(args.base, args.model, args.data, max_tokens=args.max_tokens, window=args.window,
                                column=args.column, trust_remote_code=args.trust_remote_code,
                                allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    cut = f", the last cut to fit --max-tokens {args.max_tokens}" if result["truncated_documents"] else ""
    from rich.table import Table

    table = Table(title=f"Forgetting on {result['documents']} held-out documents ({result['tokens']:,} tokens{cut}, "
                        f"window {result['window']})")
    for column in ("metric", "base", "tuned", "change"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key in REPORTED:
        table.add_row(key, f"{result['base'][key]:.4f}", f"{result['tuned'][key]:.4f}",
                      f"{result['delta_pct'][key]:+.2f}%")
    console.print(table)
    console.print(f"KL(base ‖ tuned) {result['kl']:.4g} nats/token; greedy agreement {result['top1_agreement']:.1%}")
    if result.get("window_note"):
        console.print(f"note: {result['window_note']}")
    return 0
