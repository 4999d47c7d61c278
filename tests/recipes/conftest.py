from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "recipes" / "smollm2" / "135m_lora_demo.yaml"
DATA = ROOT / "recipes" / "data" / "iso_dates"


def write_recipe(path: Path, **values) -> Path:
    """A recipe file: the tiny CPU defaults below, updated with ``values`` (None removes a key)."""
    base = {
        "dataset_name": str(DATA), "output_dir": str(path.parent / "out"), "max_steps": 6,
        "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 64, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "use_cpu": True, "bf16": False,
        "gradient_checkpointing": False, "seed": 0, "dtype": "float32", "lora_r": 8, "lora_alpha": 16,
        "lora_target_modules": "all-linear", "method": "lora", "hardware": "cpu", "budget": "8GiB",
    }
    base.update(values)
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if v is not None}, sort_keys=False))
    return path


@pytest.fixture(scope="session", autouse=True)
def demo_model_link(smollm2_tokenizer_dir) -> Path:
    """``models/SmolLM2-135M-Instruct``, where the demo recipe looks (scripts/fetch_smollm2.py makes it too). Planning
    and loading the recipe read its config alone: without a converted model at hand, the link goes to SmolLM2's
    tokenizer and config (seconds, not the conversion's ~20 s); ``demo_model_weights`` brings the weights."""
    link = ROOT / "models" / "SmolLM2-135M-Instruct"
    if not link.exists():
        link.parent.mkdir(exist_ok=True)
        if link.is_symlink():
            link.unlink(missing_ok=True)
        try:
            link.symlink_to(smollm2_tokenizer_dir, target_is_directory=True)
        except FileExistsError:  # the other test worker made it first
            pass
    return link


@pytest.fixture
def demo_model_weights(demo_model_link, smollm2_dir) -> Path:
    """The demo link, pointing at the converted model (swapped in atomically: other workers may read the config)."""
    if demo_model_link.is_symlink() and demo_model_link.resolve() != smollm2_dir.resolve():
        staged = demo_model_link.with_name(f"{demo_model_link.name}.{os.getpid()}")
        staged.unlink(missing_ok=True)
        staged.symlink_to(smollm2_dir, target_is_directory=True)
        os.replace(staged, demo_model_link)
    return demo_model_link
