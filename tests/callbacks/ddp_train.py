"""Run under ``torchrun --nproc_per_node 2``: a tiny LoRA Trainer run with MemoryBudgetCallback (gloo, DDP)."""

import json
import sys

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from hf_ftkit.callbacks.memory import MemoryBudgetCallback

config = json.loads(sys.argv[1])
out = sys.argv[2]
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)),
                       LoraConfig(r=8, target_modules="all-linear"))
ids = [list(range(5, 37))] * 8
args = TrainingArguments(output_dir=out, use_cpu=True, max_steps=4, logging_steps=2, report_to=[],
                         per_device_train_batch_size=2, save_strategy="no", ddp_backend="gloo")
trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                  callbacks=[MemoryBudgetCallback(budget="4GiB", seq_len=32)])
trainer.train()
if trainer.is_world_process_zero():
    with open(f"{out}/log_history.json", "w") as f:
        json.dump({"world_size": args.world_size, "log_history": trainer.state.log_history}, f)
