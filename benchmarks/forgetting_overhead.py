"""Wall time of a SmolLM2-135M LoRA run with and without ForgettingCallback at its defaults.

Both runs train the same steps on the same data (alternating order over repetitions); the callback runs
at its defaults: 32,768 held-out tokens (Python standard-library docstrings), a baseline before step 0 and a
final measurement (no evaluation is scheduled). The measurement's cost is fixed while training time grows
with the run, so the table also gives the run length (training tokens) at which the overhead falls under
5%. Writes ``docs/benchmarks/forgetting_overhead.md``.

    python benchmarks/forgetting_overhead.py [--steps 400] [--reps 1] [--batch-size 8] [--seq-len 256] [--arms both]

Each configuration's result is kept in ``docs/benchmarks/forgetting_overhead.json``; the page shows them all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from hf_ftkit import add_callbacks
from hf_ftkit.forgetting import ForgettingCallback, stdlib_documents
from hf_ftkit.testing import smollm2_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from freshness import stamp  # noqa: E402  (a sibling script, not a package)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
RESULTS = DOCS / "forgetting_overhead.json"


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
                         peft_config=LoraConfig(r=16, target_modules="all-linear"))
    if callback is not None:
        add_callbacks(trainer, callback)  # binds the handler, so the hooks can be timed from outside
        time_hooks(callback)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    seconds = time.perf_counter() - start
    logged = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    return seconds, int(float(logged[-1])) if logged else steps * batch * seq_len  # tokens trained on


HOOKS = ("on_init_end", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_substep_end", "on_step_end",
         "on_evaluate", "on_save", "on_log", "on_epoch_end", "on_train_end")


def time_hooks(callback: ForgettingCallback) -> None:
    """Time every event the callback receives: its preparation (tokenizing, the overlap scan), the measurements,
    the checkpoint and end-of-training writes; the total is ``callback.hook_seconds``."""
    callback.hook_seconds = 0.0  # type: ignore[attr-defined]
    for name in HOOKS:
        original = getattr(callback, name)

        def timed(*args: object, _original=original, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                callback.hook_seconds += time.perf_counter() - started  # type: ignore[attr-defined]

        setattr(callback, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--arms", choices=("both", "with"), default="both",
                        help="both: runs with and without the callback; with: one run, the callback's hook time "
                             "against the rest of the same run (half the machine time)")
    args = parser.parse_args()
    model_dir, texts = smollm2_path(), stdlib_documents()
    plain, with_callback, measurement = [], [], []
    tokens = 0
    arms = (False, True) if args.arms == "both" else (True,)
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(args.reps):
            for use in arms if rep % 2 == 0 else arms[::-1]:
                callback = ForgettingCallback(texts) if use else None
                seconds, tokens = train_once(model_dir, args.steps, args.batch_size, args.seq_len, callback,
                                             Path(scratch) / f"run{rep}{int(use)}")
                (with_callback if use else plain).append(seconds)
                print(f"rep {rep} {'with' if use else 'without'} callback: {seconds:.1f} s", flush=True)
                if callback is not None:
                    measurement.append(callback.hook_seconds)  # type: ignore[attr-defined]
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    entry = {"steps": args.steps, "reps": args.reps, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "arms": args.arms, "tokens": tokens, "documents": len(texts),
             "without_s": statistics.median(plain) if plain else None,
             "with_s": statistics.median(with_callback), "measuring_s": statistics.median(measurement),
             "commit": code_version(), "date": time.strftime("%Y-%m-%d %H:%M"), "timing": "hooks"}
    key = ("steps", "batch_size", "seq_len", "arms", "commit")
    results = [r for r in results if tuple(r.get(k, "both") for k in key) != tuple(entry[k] for k in key)]
    RESULTS.write_text(json.dumps(sorted([*results, entry], key=lambda r: (r["steps"], r["arms"])), indent=1) + "\n")
    report(json.loads(RESULTS.read_text()))


def code_version() -> str:
    """The commit measured, so that results from older code stay told apart."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "-"


def report(results: list[dict]) -> None:
    """The page: one row per measured configuration, and the run length where the overhead falls under 5%."""
    rows = []
    for r in results:
        rest = r["with_s"] - r["measuring_s"]  # the same run without its hook time
        direct = 100 * r["measuring_s"] / rest
        two_arm = f"{100 * (r['with_s'] - r['without_s']) / r['without_s']:+.1f}%" if r.get("without_s") else "-"
        command = (f"`python benchmarks/forgetting_overhead.py --steps {r['steps']} --reps {r['reps']} "
                   f"--batch-size {r['batch_size']} --seq-len {r['seq_len']} --arms {r.get('arms', 'both')}`")
        without = f"{r['without_s']:.1f}" if r.get("without_s") else "-"  # a single-arm run has none
        mark = " †" if r.get("timing") == "hooks" else ""
        rows.append(f"| {r.get('commit', '-')}{mark} | {r['steps']} | {r['tokens']:,} | {without} | "
                    f"{r['with_s']:.1f} | "
                    f"{r['measuring_s']:.1f} | **{direct:+.1f}%** | {two_arm} | {command} |")
    newest = max(results, key=lambda r: r.get("date", ""))  # the break-even is for the newest code measured
    longest = max((r for r in results if r.get("commit") == newest.get("commit")), key=lambda r: r["tokens"])
    rate = longest["tokens"] / (longest["with_s"] - longest["measuring_s"])
    break_even = longest["measuring_s"] / 0.05 * rate
    lines = [
        "# ForgettingCallback overhead",
        "",
        "SmolLM2-135M-Instruct, LoRA r=16 all-linear, SFTTrainer, steps of 8 packed sequences of up to 256 tokens "
        "(training tokens as SFTTrainer counts them), fp32 on CPU (2 cores). The callback at its defaults: 32,768 "
        "held-out tokens from Python standard-library docstrings, a baseline before step 0 (a fresh adapter is "
        "the base: one pass, whose final hidden states are kept) and a final measurement (one pass with the "
        "adapter; the base's logits are its output head, under `disable_adapter()`, applied to the kept hidden "
        "states). No evaluation is scheduled, so the measuring time is fixed per run. Rows from an older commit "
        "measured older code (6ecbece: the base's forward pass was run again at each measurement).",
        "",
        "Added time is the callback's own time over the rest of the same run: in rows marked † the wall clock of "
        "every event it receives (its preparation: tokenizing and the overlap scan; the measurements; the "
        "checkpoint and end-of-training writes), in older rows the measurements alone; where both arms were run, "
        "the difference between the run with and the run without the "
        "callback is given too (on this shared 2-core machine two runs of the same work differ by several "
        "percent, so that column is noisier).",
        "",
        "| commit | steps | training tokens | without (s) | with (s) | measuring (s) | added time | with - without "
        "| command |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"Newest measurement: commit `{newest.get('commit', '-')}` on {newest.get('date', '-')}. "
        f"Target: < 5%. Training ran at {rate:,.0f} tokens/s; at the measured cost the overhead is under 5% from "
        f"about {break_even:,.0f} training tokens (a measurement every N steps adds its cost once per N steps).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "forgetting_overhead.md").write_text(text.rstrip("\n") + "\n\n" + stamp("forgetting_overhead.md") + "\n")


if __name__ == "__main__":
    main()
