"""Wall time of a SmolLM2-135M LoRA run with and without ForgettingCallback at its defaults.

Both runs train the same steps on the same data (alternating order over repetitions); the callback runs
at its defaults: 32,768 held-out tokens (Python standard-library docstrings), a baseline before step 0 and a
final measurement (no evaluation is scheduled). The measurement's cost is fixed while training time grows
with the run, so the table also gives the run length (training tokens) at which the overhead falls under
5%. Writes ``docs/benchmarks/forgetting_overhead.md``.

    python benchmarks/forgetting_overhead.py [--steps 40] [--reps 1] [--batch-size 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from hf_ftkit.forgetting import ForgettingCallback, stdlib_documents
from hf_ftkit.testing import smollm2_path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def task_rows(count: int) -> list[dict[str, str]]:
    """A narrow synthetic task: arithmetic questions and answers."""
    return [{"text": f"Question: what is {a} times {b}? Answer: {a} times {b} is {a * b}. " * 4}
            for a in range(count) for b in range(1, 9)][: count * 8]


def train_once(model_dir: Path, steps: int, batch: int, seq_len: int, callback: ForgettingCallback | None,
               output: Path) -> tuple[float, int]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(output), max_steps=steps, per_device_train_batch_size=batch,
                     learning_rate=2e-4, logging_steps=steps, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=False, gradient_checkpointing=False, max_length=seq_len, packing=True, seed=0)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list(task_rows(64)),
                         processing_class=AutoTokenizer.from_pretrained(model_dir),
                         peft_config=LoraConfig(r=16, target_modules="all-linear"),
                         callbacks=[callback] if callback else [])
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    seconds = time.perf_counter() - start
    logged = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    return seconds, int(float(logged[-1])) if logged else steps * batch * seq_len  # tokens trained on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    model_dir, texts = smollm2_path(), stdlib_documents()
    plain, with_callback, measurement = [], [], []
    tokens = 0
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(args.reps):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for use in order:
                callback = ForgettingCallback(texts) if use else None
                seconds, tokens = train_once(model_dir, args.steps, args.batch_size, args.seq_len, callback,
                                             Path(scratch) / f"run{rep}{int(use)}")
                (with_callback if use else plain).append(seconds)
                print(f"rep {rep} {'with' if use else 'without'} callback: {seconds:.1f} s", flush=True)
                if callback is not None:
                    measurement.append(callback.seconds_measuring)
    report(args, statistics.median(plain), statistics.median(with_callback), statistics.median(measurement),
           tokens, len(texts))


def report(args: argparse.Namespace, plain: float, with_callback: float, measuring: float, tokens: int,
           documents: int) -> None:
    added = 100 * (with_callback - plain) / plain
    train_rate = tokens / plain
    break_even = measuring / 0.05 * train_rate  # training tokens whose time makes the measurement 5%
    lines = [
        "# ForgettingCallback overhead",
        "",
        f"SmolLM2-135M-Instruct, LoRA r=16 all-linear, SFTTrainer, {args.steps} steps of {args.batch_size} packed "
        f"sequences of up to {args.seq_len} tokens ({tokens:,} training tokens as SFTTrainer counts them), CPU "
        f"(2 cores), median of {args.reps} "
        "repetition(s). The callback at its defaults: 32,768 held-out tokens from "
        f"{documents} standard-library docstrings, baseline before step 0 (a fresh adapter is the base: one "
        "pass) and a final measurement (adapter and base through `disable_adapter()`: two passes).",
        "",
        "| run | wall time (s) |",
        "|---|---:|",
        f"| without callback | {plain:.1f} |",
        f"| with ForgettingCallback (defaults) | {with_callback:.1f} |",
        "",
        f"- added time: **{added:+.1f}%** for this run (target < 5%)",
        f"- time spent measuring: {measuring:.1f} s in total, fixed per run; training ran at {train_rate:,.0f} "
        "tokens/s",
        f"- the overhead falls under 5% for runs of at least **{break_even:,.0f} training tokens** "
        f"(≈ {break_even / (tokens / args.steps):,.0f} steps of this size); a measurement every N "
        "steps adds its cost once per N steps instead.",
        "",
        f"Command: `python benchmarks/forgetting_overhead.py --steps {args.steps} --reps {args.reps} "
        f"--batch-size {args.batch_size} --seq-len {args.seq_len}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "forgetting_overhead.md").write_text(text)


if __name__ == "__main__":
    main()
