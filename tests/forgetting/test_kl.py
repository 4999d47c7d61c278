"""KL(base ‖ tuned): zero when untouched, positive after training, the same through PEFT or a top-k cache."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from hf_ftkit.forgetting.evaluator import ForgettingEvaluator, frozen_base
from hf_ftkit.forgetting.heldout import Document

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def documents(heldout_texts):
    return [Document(t[:1500]) for t in heldout_texts[:3]]


def evaluator(documents, tokenizer, top_k=64):
    return ForgettingEvaluator(documents, tokenizer, window=128, max_tokens=2000, batch_tokens=512, top_k=top_k)


def lora_model(base_dir, *, random_b: bool, model=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = model or AutoModelForCausalLM.from_pretrained(base_dir)
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


def _perturb_adapter(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)


def test_peft_base_hidden_states_cached_at_the_baseline_give_the_exact_kl(smollm2_dir, smollm2_tokenizer,
                                                                          documents):
    model = lora_model(smollm2_dir, random_b=False)
    during_training = evaluator(documents, smollm2_tokenizer)
    base = during_training.measure(model, 0, baseline=True)  # one pass of the base: its hidden states are kept
    assert during_training.hidden is not None and len(during_training.hidden.batches) == len(
        during_training.encoded.batches)
    _perturb_adapter(model)
    cached = during_training.measure(model, 1)  # the tuned pass plus the base's output head only
    recomputed = evaluator(documents, smollm2_tokenizer).measure(model, 1)  # tuned and base forward passes
    assert cached.values["kl"] > 1e-4
    assert cached.values["kl"] == pytest.approx(recomputed.values["kl"], rel=1e-5)
    assert cached.values["top1_agreement"] == recomputed.values["top1_agreement"]
    assert cached.values["bits_per_byte"] == pytest.approx(recomputed.values["bits_per_byte"], rel=1e-9)
    for result in (cached, recomputed):  # the base's own metrics come out of the same pass
        assert result.base_values["bits_per_byte"] == pytest.approx(base.values["bits_per_byte"], rel=1e-9)
        assert result.base_values["word_perplexity"] == pytest.approx(base.values["word_perplexity"], rel=1e-9)


def test_hidden_state_cache_is_refused_when_the_base_trains_or_the_logits_are_not_the_plain_head(
        smollm2_tokenizer, documents):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0)
    torch.manual_seed(0)
    model = lora_model(None, random_b=False, model=Gemma2ForCausalLM(config))  # logits = 3·tanh(head / 3)
    capped = evaluator(documents, smollm2_tokenizer)
    capped.measure(model, 0, baseline=True)
    assert capped.hidden is None  # the head alone does not reproduce the logits
    _perturb_adapter(model)
    after = capped.measure(model, 1)
    assert after.values["kl"] > 0 and after.values["top1_agreement"] < 1  # via the base's forward pass
    model.get_base_model().model.norm.weight.requires_grad_(True)  # a base weight that trains
    assert not frozen_base(model)


def _unwrapped(model):
    """The base with LoRA layers removed (unmerged), as a plain transformers model."""
    from peft.tuners.lora import LoraModel  # noqa: F401  (import keeps the class registry loaded)

    for name, module in list(model.named_modules()):
        if hasattr(module, "base_layer"):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], module.base_layer)
    return model
