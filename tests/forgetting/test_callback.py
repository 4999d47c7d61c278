"""ForgettingCallback inside a real SFTTrainer run on SmolLM2-135M (LoRA, CPU)."""

from __future__ import annotations

import json

import pytest

from hf_ftkit.errors import BadInputError, HfFtkitWarning
from hf_ftkit.forgetting.callback import ForgettingCallback

pytestmark = pytest.mark.slow

TASK = [{"text": f"Question: what is {a} plus {b}? Answer: {a + b}."} for a in range(12) for b in range(4)]


def sft_run(smollm2_dir, tmp_path, callback, max_steps=6):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                     learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=False, gradient_checkpointing=False, max_length=64, seed=0)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(smollm2_dir), args=args,
                         train_dataset=Dataset.from_list(TASK),
                         processing_class=AutoTokenizer.from_pretrained(smollm2_dir),
                         peft_config=LoraConfig(r=8, target_modules="all-linear"), callbacks=[callback])
    trainer.train()
    return trainer


def test_baseline_schedule_logging_and_outputs(smollm2_dir, tmp_path, heldout_texts):
    callback = ForgettingCallback(heldout_texts, max_tokens=1024, window=128, batch_tokens=512, every=3)
    trainer = sft_run(smollm2_dir, tmp_path, callback)
    measured = [e for e in trainer.state.log_history if "forgetting/bits_per_byte" in e]
    assert [e["step"] for e in measured] == [0, 3, 6]  # baseline before step 0, then every 3 steps
    assert measured[0]["forgetting/kl"] == pytest.approx(0, abs=1e-6)
    assert measured[0]["forgetting/bits_per_byte_delta_pct"] == 0
    assert measured[-1]["forgetting/kl"] > 0
    report = json.loads((tmp_path / "forgetting.json").read_text())
    assert [h["step"] for h in report["history"]] == [0, 3, 6] and report["best"]["step"] in (3, 6)
    assert (tmp_path / "forgetting.png").stat().st_size > 10_000


def test_stop_action_ends_training_at_first_crossing_with_a_checkpoint(smollm2_dir, tmp_path, heldout_texts):
    callback = ForgettingCallback(heldout_texts, max_tokens=1024, window=128, batch_tokens=512, every=2,
                                  threshold={"kl": 1e-9}, action="stop")
    with pytest.warns(HfFtkitWarning, match="forgetting limit passed at step 2"):
        trainer = sft_run(smollm2_dir, tmp_path, callback, max_steps=8)
    assert trainer.state.global_step == 2
    assert (tmp_path / "checkpoint-2").is_dir()
    assert json.loads((tmp_path / "forgetting.json").read_text())["crossed"]["step"] == 2


def test_bad_settings_fail_at_construction(heldout_texts):
    with pytest.raises(BadInputError, match="unknown metric 'bpb'"):
        ForgettingCallback(heldout_texts, threshold={"bpb": 1})
    with pytest.raises(BadInputError, match="empty"):
        ForgettingCallback([])
    with pytest.raises(BadInputError, match="every=0"):
        ForgettingCallback(heldout_texts, every=0)


def test_too_little_data_warns_and_switches_off_without_killing_training(smollm2_dir, tmp_path):
    callback = ForgettingCallback(["Far too short."], every=1)
    with pytest.warns(HfFtkitWarning, match="switched off"):
        trainer = sft_run(smollm2_dir, tmp_path, callback, max_steps=2)
    assert trainer.state.global_step == 2 and not callback.history
