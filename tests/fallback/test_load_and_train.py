"""Real components: a setup chosen for a small budget loads 4-bit SmolLM2 and trains QLoRA on CPU."""

import pytest
import torch

from hf_ftkit.fallback.ladder import choose_setup
from hf_ftkit.planner.estimate import estimate
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.resolve import resolve_model

SEQ = 64


def _qlora_only_budget(spec) -> int:
    lora_gc = estimate(spec, PlanInputs(method="lora", gradient_checkpointing=True, seq_len=SEQ, batch_size=2))
    qlora_gc = estimate(spec, PlanInputs(method="qlora", gradient_checkpointing=True, double_quant=False,
                                         seq_len=SEQ, batch_size=2))
    return (lora_gc.peak_bytes + qlora_gc.peak_bytes) // 2


@pytest.mark.slow
def test_qlora_setup_loads_4bit_and_trains(smollm2_dir, tmp_path):
    import bitsandbytes as bnb
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    spec = resolve_model(str(smollm2_dir))
    setup = choose_setup(spec, _qlora_only_budget(spec), seq_len=SEQ, batch_size=2)
    assert setup.inputs.method == "qlora"

    model = setup.load_model(str(smollm2_dir))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = tokenizer(text, truncation=True, max_length=SEQ)["input_ids"]
    data = Dataset.from_dict({"input_ids": [ids] * 2, "labels": [ids] * 2})
    overrides = setup.training_overrides()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, max_steps=8, learning_rate=2e-3,
                             logging_steps=1, report_to=[], save_strategy="no", seed=0, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # one repeated batch: the adapter learns it
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
