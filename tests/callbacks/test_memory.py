import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_ftkit.callbacks.memory import MemoryBudgetCallback
from hf_ftkit.errors import DoesNotFitError

KEYS = ("memory/cpu_peak_rss_gib", "memory/planned_gib")  # on CPU: RSS under its own key, no error vs the GPU plan


def _trainer(tmp_path, config, callback, steps=4):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)),
                           LoraConfig(r=8, target_modules="all-linear"))
    ids = [list(range(5, 37))] * 8
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=steps, logging_steps=2,
                             report_to=[], per_device_train_batch_size=2, save_strategy="no")
    return Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                   callbacks=[callback])


def test_logs_measured_and_planned_memory_under_a_real_trainer(tmp_path, tiny_llama_config):
    callback = MemoryBudgetCallback(budget="4GiB", seq_len=32)
    trainer = _trainer(tmp_path, tiny_llama_config, callback)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert all(key in entry for key in KEYS)
        assert entry["memory/cpu_peak_rss_gib"] > 0 and entry["memory/planned_gib"] > 0
        assert "memory/plan_error_pct" not in entry and "memory/peak_gib" not in entry
    assert callback.plan.inputs.method == "lora" and callback.plan.inputs.lora_r == 8
    assert callback.plan.fits
    # PEFT expands target_modules to full module paths once the model is wrapped: still every adapter counted
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert callback.plan.trainable_params == trainable


def test_strict_mode_stops_a_run_that_cannot_fit_before_a_step(tmp_path, tiny_llama_config):
    trainer = _trainer(tmp_path, tiny_llama_config, MemoryBudgetCallback(budget="512MiB", seq_len=32, strict=True))
    with pytest.raises(DoesNotFitError, match="exceeds the budget"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_default_mode_warns_instead(tmp_path, tiny_llama_config):
    from hf_ftkit.errors import HfFtkitWarning

    trainer = _trainer(tmp_path, tiny_llama_config, MemoryBudgetCallback(budget="512MiB", seq_len=32), steps=2)
    with pytest.warns(HfFtkitWarning, match="budget"):  # the plan, then the measured peak
        trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # torchrun tests share one worker
def test_logs_under_torchrun_ddp(tmp_path, tiny_llama_config):
    script = Path(__file__).with_name("ddp_train.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
           json.dumps(tiny_llama_config), str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    data = json.loads((tmp_path / "log_history.json").read_text())
    assert data["world_size"] == 2
    logged = [entry for entry in data["log_history"] if "loss" in entry]
    assert logged and all("memory/cpu_peak_rss_max_gib" in e and all(k in e for k in KEYS) for e in logged)
    assert all(e["memory/cpu_peak_rss_max_gib"] >= e["memory/cpu_peak_rss_gib"] for e in logged)


@pytest.mark.slow
def test_plans_an_sfttrainer_run_with_its_own_defaults(tmp_path, smollm2_dir):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"text": ["The memory planner counts every byte a training step keeps."] * 8})
    callback = MemoryBudgetCallback(budget="24GiB")
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=2, logging_steps=1, report_to=[],
                     per_device_train_batch_size=2, max_length=64, save_strategy="no")
    trainer = SFTTrainer(model=str(smollm2_dir), args=args, train_dataset=data,
                         peft_config=LoraConfig(r=8, target_modules="all-linear"), callbacks=[callback])
    trainer.train()
    inputs = callback.plan.inputs
    assert inputs.gradient_checkpointing and inputs.seq_len == 64  # SFTConfig's default and max_length
    assert inputs.method == "lora" and inputs.lora_r == 8
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(all(key in entry for key in KEYS) for entry in logged)


def test_reporting_callbacks_before_it_receive_the_memory_keys(tmp_path, tiny_llama_config):
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):  # stands for TensorBoard/W&B, which Trainer places first
        seen: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs or {}))

    reporter = Reporter()
    trainer = _trainer(tmp_path, tiny_llama_config, MemoryBudgetCallback(budget="4GiB", seq_len=32))
    trainer.callback_handler.callbacks.insert(0, reporter)
    trainer.train()
    losses = [logs for logs in reporter.seen if "loss" in logs]
    assert losses and all(all(key in logs for key in KEYS) for logs in losses)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.count("Reporter") == 1 and names.count("MemoryBudgetCallback") == 1
