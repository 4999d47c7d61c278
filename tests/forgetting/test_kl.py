"""KL(base ‖ tuned): zero when untouched, positive after training, the same through PEFT or a top-k cache."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from hf_ftkit.forgetting.evaluator import ForgettingEvaluator
from hf_ftkit.forgetting.heldout import Document

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def documents(heldout_texts):
    return [Document(t[:1500]) for t in heldout_texts[:3]]


def evaluator(documents, tokenizer, top_k=64):
    return ForgettingEvaluator(documents, tokenizer, window=128, max_tokens=2000, batch_tokens=512, top_k=top_k)


def lora_model(base_dir, *, random_b: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=not random_b))
    if random_b:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.3)
    return peft_model


def test_untouched_model_has_zero_kl_and_full_agreement(smollm2_dir, smollm2_tokenizer, documents):
    model = lora_model(smollm2_dir, random_b=False)  # B = 0: the adapter changes nothing
    result = evaluator(documents, smollm2_tokenizer).measure(model, 0, baseline=True)
    assert result.values["kl"] == 0 and result.values["top1_agreement"] == 1.0  # recognised, one pass
    base = model.get_base_model()
    with model.disable_adapter():  # computed: the model against itself as the reference
        computed = evaluator(documents, smollm2_tokenizer).measure(base, 0, reference=base)
    assert computed.values["kl"] == pytest.approx(0, abs=1e-6) and computed.values["top1_agreement"] == 1.0
    assert computed.values["bits_per_byte"] == pytest.approx(result.values["bits_per_byte"], rel=1e-9)


def test_kl_is_positive_after_training_steps(smollm2_dir, smollm2_tokenizer, documents):
    model = lora_model(smollm2_dir, random_b=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = smollm2_tokenizer(["The answer is always forty-two. " * 8] * 2, return_tensors="pt")
    for _ in range(3):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    result = evaluator(documents, smollm2_tokenizer).measure(model, 3)
    assert result.values["kl"] > 1e-4
    assert model.training  # mode restored


def test_peft_path_equals_the_cached_full_ft_path(smollm2_dir, smollm2_tokenizer, documents):
    peft_model = lora_model(smollm2_dir, random_b=True)
    via_peft = evaluator(documents, smollm2_tokenizer).measure(peft_model, 1)
    # full-FT path: capture the base's distribution, then measure the merged (full) model against it
    with peft_model.disable_adapter():
        base = copy.deepcopy(peft_model.get_base_model())
    full_ft = evaluator(documents, smollm2_tokenizer, top_k=8192)
    full_ft.measure(_unwrapped(base), 0, baseline=True)
    merged = peft_model.merge_and_unload()
    via_cache = full_ft.measure(merged, 1)
    assert via_peft.values["kl"] > 1e-3
    assert via_cache.values["kl"] == pytest.approx(via_peft.values["kl"], rel=0.02)
    assert via_cache.values["kl"] <= via_peft.values["kl"] * (1 + 1e-4)  # the top-k KL is a lower bound
    assert via_cache.values["top1_agreement"] == pytest.approx(via_peft.values["top1_agreement"], abs=1e-3)
    assert via_cache.values["bits_per_byte"] == pytest.approx(via_peft.values["bits_per_byte"], rel=1e-4)


def _unwrapped(model):
    """The base with LoRA layers removed (unmerged), as a plain transformers model."""
    from peft.tuners.lora import LoraModel  # noqa: F401  (import keeps the class registry loaded)

    for name, module in list(model.named_modules()):
        if hasattr(module, "base_layer"):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], module.base_layer)
    return model
