"""AdapterSet against models loaded with one adapter each."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_ftkit.errors import BadInputError
from hf_ftkit.merge.hotswap import AdapterSet

IDS = torch.tensor([[1, 450, 3290, 282, 4649, 314, 2], [1, 1842, 253, 1345, 30, 2, 2]])


def alone(base_dir, adapter) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def served(tiny_model_dir, tiny_adapters):
    return AdapterSet(tiny_model_dir, {"a": tiny_adapters["task_a"], "b": tiny_adapters["task_b"],
                                       "r": tiny_adapters["rslora"]})


def test_each_adapter_equals_a_model_loaded_with_it_alone(tiny_model_dir, tiny_adapters, served):
    for name, key in (("a", "task_a"), ("b", "task_b"), ("r", "rslora")):
        with served.use(name) as model, torch.no_grad():
            got = model(input_ids=IDS).logits
        assert torch.allclose(got, alone(tiny_model_dir, tiny_adapters[key]), atol=1e-4)


def test_mixed_batch_rows_use_their_own_adapter(tiny_model_dir, tiny_adapters, served):
    batch = torch.cat([IDS[:1], IDS[:1], IDS[:1]])
    logits = served.logits(batch, ["a", "r", "__base__"])
    assert torch.allclose(logits[0], alone(tiny_model_dir, tiny_adapters["task_a"])[0], atol=1e-4)
    assert torch.allclose(logits[1], alone(tiny_model_dir, tiny_adapters["rslora"])[0], atol=1e-4)
    with served.use("__base__") as model, torch.no_grad():
        assert torch.allclose(logits[2], model(input_ids=IDS[:1]).logits[0], atol=1e-4)


def test_active_adapter_is_restored_and_memory_grows_by_adapters_only(tiny_model_dir, tiny_adapters, served):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with served.use("b"):
        pass
    assert served.model.active_adapter == "a"
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    adapter_params = 0
    for key in ("task_a", "task_b", "rslora"):
        with safe_open(str(tiny_adapters[key] / "adapter_model.safetensors"), "pt") as handle:
            adapter_params += sum(handle.get_slice(k).get_shape()[0] * handle.get_slice(k).get_shape()[1]
                                  for k in handle.keys())
    total = sum(p.numel() for p in served.model.parameters())
    assert total == base_params + adapter_params
    assert served.adapter_bytes == adapter_params * 4


def test_unknown_adapter_and_batch_mismatch_are_bad_input(served):
    with pytest.raises(BadInputError, match="no adapter named 'z'; loaded: a, b, r"):
        with served.use("z"):
            pass
    with pytest.raises(BadInputError, match="one name per row"):
        served.logits(IDS, ["a"])
