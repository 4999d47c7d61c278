"""``hf-ftkit train`` for real: SFTTrainer runs on CPU with hf-ftkit's callbacks, outputs and summary."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from hf_ftkit.cli.main import main
from hf_ftkit.errors import BadInputError
from hf_ftkit.recipes import load_recipe
from hf_ftkit.recipes.run import train
from tests.recipes.conftest import DEMO, ROOT, write_recipe

SUMMARY_KEYS = {"status", "global_step", "versions", "plan", "chosen_setup", "fallbacks", "measured_memory",
                "forgetting", "merged", "timings", "final", "resumed_from"}


@pytest.mark.slow  # a whole training run (~10 s): the full suite runs it
def test_tiny_recipe_trains_merges_and_writes_every_output(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tiny_model_dir.parent)  # the recipe names the model by a relative path
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path=tiny_model_dir.name, forgetting_data="stdlib",
                        forgetting_max_tokens=1024, merge=True, merge_dtype="fp32")
    out = tmp_path / "out"
    _earlier_run(out)
    assert main(["train", "--config", str(path), "--overwrite"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps lines at the terminal width
    assert "before step 0: load" in printed and "forgetting baseline on 1,024 held-out tokens" in printed
    # --overwrite replaced the earlier run's outputs and nothing else
    assert not (out / "checkpoint-99").exists() and not (out / "fallback-1-qlora").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-notes.txt").read_text() == "mine"
    summary = json.loads((out / "run_summary.json").read_text())
    change = summary["forgetting"]["final"]["bits_per_byte_delta_pct"]
    assert f"held-out bits per byte {change:+.1f}%" in printed  # beside the loss
    assert SUMMARY_KEYS <= set(summary) and summary["status"] == "completed" and summary["global_step"] == 6
    assert summary["versions"]["libraries"]["trl"] and summary["versions"]["libraries"]["transformers"]
    assert summary["chosen_setup"]["method"] == "lora" and summary["plan"]["fits"] is True
    assert summary["forgetting"]["baseline"]["step"] == 0 and summary["forgetting"]["final"]["step"] == 6
    assert summary["merged"]["verification"]["max_abs_logit_diff"] < 1e-3
    assert summary["measured_memory"]["device"] in ("cpu",) or "peak_allocated_bytes" in summary["measured_memory"]
    assert set(load_file(out / "adapter_model.safetensors")) and (out / "merged" / "model.safetensors").is_file()
    assert (out / "recipe.yaml").read_text().startswith("# Resolved recipe")
    assert load_recipe(out / "recipe.yaml").training.max_steps == 6  # the resolved recipe reruns as it is
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: peft" in card and "hf-ftkit" in card
    # the adapter names its base as the recipe and the card do
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_dir.name
    assert f"base_model: {tiny_model_dir.name}" in card


@pytest.mark.slow
def test_demo_recipe_end_to_end_on_smollm2(tmp_path, demo_model_weights):
    out, data = tmp_path / "demo", tmp_path / "iso_dates"
    data.mkdir()
    source = ROOT / "recipes" / "data" / "iso_dates"
    shutil.copyfile(source / "train.jsonl", data / "train.jsonl")
    # the first 40 of the 200 test examples: the evaluation is checked, not measured (it was a third of the time)
    (data / "test.jsonl").write_text("".join((source / "test.jsonl").read_text().splitlines(keepends=True)[:40]))
    code = main(["train", "--config", str(DEMO), "--output_dir", str(out), "--max_steps", "8", "--eval_steps", "8",
                 "--save_steps", "8", "--logging_steps", "2", "--forgetting_max_tokens", "1024",
                 "--dataset_name", str(data)])
    assert code == 0
    summary = json.loads((out / "run_summary.json").read_text())
    final = summary["final"]
    assert final["last_logged_loss"] < 0.5 * final["first_logged_loss"]  # the task is learnt, not just touched
    assert final["eval_loss"] is not None
    forgetting = summary["forgetting"]
    assert forgetting["final"]["kl"] > 0 and forgetting["final"]["step"] == 8
    assert summary["merged"]["verification"]["top1_agreement"] == 1.0
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml", "README.md",
                 "forgetting.json", "forgetting.png", "merged/model.safetensors", "merged/config.json"):
        assert (out / name).is_file(), name


def _earlier_run(out):
    """An output folder holding an earlier run (a checkpoint, a fallback folder, a summary) and the user's files."""
    (out / "checkpoint-99").mkdir(parents=True)
    (out / "checkpoint-99" / "trainer_state.json").write_text("{}")
    (out / "fallback-1-qlora").mkdir()
    (out / "run_summary.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-notes.txt").write_text("mine")  # a file, not a run's checkpoint folder


def test_max_length_that_cuts_every_completion_is_one_sentence(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(tiny_model_dir), max_length=16)
    with pytest.raises(BadInputError, match="max_length 16 cuts off every completion"):
        train(load_recipe(path))


def test_overwrite_keeps_the_earlier_run_when_the_new_one_fails_before_training(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    _earlier_run(out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(tiny_model_dir), max_length=16, output_dir=str(out))
    with pytest.raises(BadInputError, match="max_length 16 cuts off every completion"):
        train(load_recipe(path), overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "checkpoint-99" / "trainer_state.json").read_text() == "{}"


@pytest.mark.slow
def test_qlora_recipe_runs_real_4bit_steps(tmp_path, smollm2_dir):
    path = write_recipe(tmp_path / "q.yaml", model_name_or_path=str(smollm2_dir), method="qlora", max_steps=3,
                        per_device_train_batch_size=2, max_length=96)
    seen = {}

    import hf_ftkit.recipes.run as run_module

    original = run_module._Run.make_trainer

    def spy(self, setup, folder):  # record what the trainer really trains
        trainer = original(self, setup, folder)
        from bitsandbytes.nn import Linear4bit

        seen["4bit"] = sum(isinstance(m, Linear4bit) for m in trainer.model.modules())
        seen["trainable"] = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        return trainer

    run_module._Run.make_trainer = spy
    try:
        result = train(load_recipe(path))
    finally:
        run_module._Run.make_trainer = original
    assert result.status == "completed" and result.global_step == 3
    assert seen["4bit"] == 7 * 30  # every linear of the 30 blocks is bitsandbytes 4-bit
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])
    assert result.summary["chosen_setup"]["method"] == "qlora" and result.summary["plan"]["inputs"]["method"] == "qlora"
    loss = result.summary["final"]["last_logged_loss"]
    assert loss == loss and loss < 20  # finite
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
