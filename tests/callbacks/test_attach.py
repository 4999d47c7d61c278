"""``add_callbacks``: hf-ftkit's callbacks ahead of the reporting integrations through the Trainer's public
handler, with no frame inspection; ``callbacks=[...]`` keeps working through the fallback."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from hf_ftkit import ForgettingCallback, MemoryBudgetCallback, add_callbacks


class Reporter(TrainerCallback):
    """Stands in for TensorBoard/W&B: records what each on_log call carries."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs or {}))


def trainer_for(model_dir, tmp_path, callbacks):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    ids = [list(range(5, 37))] * 8
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=2, logging_steps=1, report_to=[],
                             per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True)
    return Trainer(model=model, args=args, processing_class=tokenizer, callbacks=callbacks,
                   train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))


@pytest.mark.parametrize("attached", [True, False])
def test_keys_reach_the_reporting_callbacks(tiny_model_dir, tmp_path, heldout_texts, monkeypatch, attached):
    reporter = Reporter()
    memory = MemoryBudgetCallback(budget="8GiB", seq_len=32)
    forgetting = ForgettingCallback(heldout_texts, max_tokens=512, window=64, every=2, check_overlap=False)
    if attached:
        trainer = add_callbacks(trainer_for(tiny_model_dir, tmp_path, [reporter]), memory, forgetting)
        assert trainer.callback_handler.callbacks[:2] == [memory, forgetting]

        def no_frames(*args):  # the public path needs no frame inspection
            raise AssertionError("frame inspection used")

        import hf_ftkit.callbacks.memory as memory_module
        import hf_ftkit.forgetting.callback as forgetting_module

        monkeypatch.setattr(forgetting_module, "sys", SimpleNamespace(_getframe=no_frames))
        monkeypatch.setattr(memory_module, "_move_to_front", no_frames)
    else:
        trainer = trainer_for(tiny_model_dir, tmp_path, [reporter, memory, forgetting])
    trainer.train()
    monkeypatch.undo()
    steps = [entry for entry in reporter.logged if "loss" in entry]
    assert steps and all("memory/planned_gib" in entry for entry in steps)  # memory keys came first
    assert any("forgetting/bits_per_byte" in entry for entry in reporter.logged)
