"""Composition against the exact weighted sum, with real adapters on SmolLM2-135M."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_ftkit.errors import BadInputError
from hf_ftkit.merge.adapters import read_adapter
from hf_ftkit.merge.compose import METHODS, compose

EXACT_TOL = 1e-6  # float32 rounding of the stacked factors


def test_exact_is_the_weighted_sum_across_ranks_and_targets(tiny_model_dir, tiny_adapters):
    composed = compose(tiny_model_dir, [tiny_adapters["task_a"], tiny_adapters["rslora"]], [0.7, -0.4])
    assert composed.exact and composed.config["r"] == 8 + 4
    assert composed.max_error < EXACT_TOL
    # independent check of one layer from the raw tensors: ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ
    a, r = read_adapter(tiny_adapters["task_a"]), read_adapter(tiny_adapters["rslora"])
    name = "model.layers.1.self_attn.q_proj"
    expected = 0.7 * a.modules()[name].delta() - 0.4 * r.modules()[name].delta()
    got = composed.as_adapter().modules()[name].delta()
    assert torch.allclose(got, expected, rtol=0, atol=1e-6 * expected.abs().max())
    only_a = "model.layers.1.mlp.gate_proj"  # targeted by task_a only
    assert torch.allclose(composed.as_adapter().modules()[only_a].delta(), 0.7 * a.modules()[only_a].delta(),
                          atol=1e-6 * a.modules()[only_a].delta().abs().max())


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("exact", "cat")])
def test_every_peft_method_runs_and_reports_its_error(tiny_model_dir, tiny_adapters, method):
    density = 0.5 if any(k in method for k in ("ties", "dare", "magnitude")) else None
    composed = compose(tiny_model_dir, [tiny_adapters["narrow_a"], tiny_adapters["narrow_b"]], [0.6, 0.4], method,
                       density=density)
    assert not composed.exact
    assert set(composed.layer_errors) == set(read_adapter(tiny_adapters["narrow_a"]).modules())
    assert 0 < composed.max_error  # approximate: the report says how far from Σ wᵢ·ΔWᵢ
    if method == "linear":
        # PEFT's linear mixes A and B separately: not the weighted sum (peft #3004)
        assert composed.max_error > 0.1
    assert composed.config["lora_alpha"] == composed.config["r"] and not composed.config["use_rslora"]


def test_svd_of_exact_sum_at_full_rank_is_exact(tiny_model_dir, tiny_adapters):
    pair = [tiny_adapters["narrow_a"], tiny_adapters["narrow_b"]]
    composed = compose(tiny_model_dir, pair, [0.6, 0.4], "svd", svd_rank=16)
    assert composed.max_error < 1e-4  # rank 16 holds the sum of two rank-8 updates


@pytest.mark.parametrize("name", ["rslora", "dora", "head", "embed", "task_a"])
def test_identity_composition_reproduces_the_adapter_exactly(tiny_model_dir, tiny_adapters, name):
    composed = compose(tiny_model_dir, [tiny_adapters[name]], [1.0])
    original = load_file(str(tiny_adapters[name] / "adapter_model.safetensors"))
    assert composed.tensors.keys() == original.keys()
    assert all(torch.equal(composed.tensors[k], original[k]) for k in original)
    assert composed.config == json.loads((tiny_adapters[name] / "adapter_config.json").read_text())
    assert composed.max_error == 0


def test_single_adapter_weight_scales_delta_exactly_with_rslora(tiny_model_dir, tiny_adapters):
    composed = compose(tiny_model_dir, [tiny_adapters["rslora"]], [-0.5])
    source = read_adapter(tiny_adapters["rslora"]).modules()
    for name, module in composed.as_adapter().modules().items():
        assert torch.allclose(module.delta(), -0.5 * source[name].delta(), atol=1e-7)


def test_equal_rank_methods_refuse_different_ranks_with_the_fix(tiny_model_dir, tiny_adapters):
    with pytest.raises(BadInputError, match=r"needs equal ranks.*--method exact"):
        compose(tiny_model_dir, [tiny_adapters["task_a"], tiny_adapters["rslora"]], [0.5, 0.5], "linear")


@pytest.mark.parametrize(
    ("names", "kwargs", "message"),
    [
        (["task_a", "dora"], {}, "DoRA"),
        (["task_a", "task_b"], {"weights": [1.0]}, "1 weights for 2 adapters"),
        (["task_a", "task_b"], {"method": "average"}, "unknown method"),
        (["task_a", "task_b"], {"method": "ties"}, "--density"),
        (["dora"], {"weights": [0.5]}, "DoRA adapter cannot be scaled"),
    ],
)
def test_bad_compositions_fail_early_with_the_reason(tiny_model_dir, tiny_adapters, names, kwargs, message):
    with pytest.raises(BadInputError, match=message):
        compose(tiny_model_dir, [tiny_adapters[n] for n in names], **kwargs)


def test_conflicting_modules_to_save_are_refused(tiny_model_dir, tiny_adapters, tmp_path):
    import shutil

    twin = tmp_path / "head2"
    shutil.copytree(tiny_adapters["head"], twin)
    with pytest.raises(BadInputError, match="both replace lm_head.weight"):
        compose(tiny_model_dir, [tiny_adapters["head"], twin])


def test_composed_adapter_loads_in_peft_and_matches_the_sum(tiny_model_dir, tiny_adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    composed = compose(tiny_model_dir, [tiny_adapters["task_a"], tiny_adapters["rslora"]], [0.5, 0.5])
    composed.save(tmp_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    a, r = read_adapter(tiny_adapters["task_a"]).modules(), read_adapter(tiny_adapters["rslora"]).modules()
    name = "model.layers.0.self_attn.v_proj"
    expected = 0.5 * a[name].delta() + 0.5 * r[name].delta()
    assert torch.allclose(layer.get_delta_weight("default"), expected, atol=1e-6 * expected.abs().max())
