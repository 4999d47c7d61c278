import json
from pathlib import Path

import pytest

from hf_ftkit._data import load
from hf_ftkit.errors import BadInputError, ModelNotFoundError
from hf_ftkit.planner.resolve import catalog_ids, resolve_model
from hf_ftkit.planner.structure import spec_from_config

# Parameter counts as published on the models' hub pages / reported by transformers.
PUBLISHED = {
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "google/gemma-2-2b": 2_614_341_888,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "HuggingFaceTB/SmolLM2-135M": 134_515_008,
    "openai-community/gpt2": 124_439_808,
}
REQUIRED = [
    "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-405B", "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
    "mistralai/Mistral-7B-v0.1", "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B",
    "Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-72B",
    "Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B", "google/gemma-2-2b", "google/gemma-2-9b", "google/gemma-2-27b",
    "google/gemma-3-1b-pt", "microsoft/Phi-3-mini-4k-instruct", "microsoft/phi-4", "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-1.7B", "allenai/OLMo-2-1124-7B", "openai-community/gpt2",
]


def test_catalog_holds_the_required_models():
    assert set(REQUIRED) <= set(catalog_ids())
    assert len(catalog_ids()) >= 25


@pytest.mark.parametrize(("model", "count"), sorted(PUBLISHED.items()))
def test_exact_parameter_counts(model, count):
    assert resolve_model(model).params_total == count


@pytest.mark.parametrize("entry", load("catalog")["models"], ids=lambda e: e["id"])
def test_every_entry_builds_on_meta_and_matches_its_stored_spec(entry):
    built = spec_from_config(dict(entry["config"]), entry["id"])
    assert built.to_dict() == entry["spec"]


def test_aliases_and_case_resolve_to_the_same_spec():
    a = resolve_model("meta-llama/Llama-3.1-8B-Instruct")
    b = resolve_model("META-LLAMA/llama-3.1-8b")
    assert a.params_total == b.params_total == PUBLISHED["meta-llama/Llama-3.1-8B"]


def test_local_config_path_and_directory(tmp_path: Path, tiny_llama_config):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config))
    by_dir = resolve_model(str(tmp_path))
    by_file = resolve_model(str(tmp_path / "config.json"))
    assert by_dir.params_total == by_file.params_total > 0
    assert by_dir.num_layers == 2


def test_a_config_in_the_hub_cache_is_read_before_the_catalog(tmp_path: Path, monkeypatch, tiny_llama_config):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(tiny_llama_config))
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("acme/tiny").num_layers == 2
    # a catalog model not in this cache still resolves from the catalog
    assert resolve_model("meta-llama/Llama-3.2-1B").params_total == PUBLISHED["meta-llama/Llama-3.2-1B"]


def test_unknown_architecture_not_in_catalog_still_counts_exactly(tmp_path: Path):
    config = {"model_type": "starcoder2", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = resolve_model(str(tmp_path))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert spec.params_total == sum(p.numel() for p in model.parameters())


def test_unknown_model_offline_names_the_places_looked_in(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("nobody/no-such-model-xyz", allow_online=True)
    message = str(err.value)
    for place in ("local path", "Hugging Face cache", "catalog", "config.json"):
        assert place in message


def test_directory_without_config(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_broken_config_file(tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(BadInputError, match="not a readable config.json"):
        resolve_model(str(path))


def test_a_config_with_the_floats_transformers_writes_as_objects_is_read(tmp_path: Path):
    """transformers saves inf/nan as {"__float__": "Infinity"} (Falcon-H1's time_step_limit) and reads them back."""
    config = {"model_type": "falcon_h1", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024,
              "mamba_d_ssm": 256, "mamba_n_heads": 4, "mamba_d_head": 64, "mamba_d_state": 16,
              "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert resolve_model(str(tmp_path)).num_layers == 2


@pytest.mark.parametrize("model_type, sizes", [
    ("mamba", {}),
    # num_heads is Mamba-2's state-space heads: it was read as attention heads, and Mamba-2 planned as attention
    ("mamba2", {"num_heads": 8, "head_dim": 64, "expand": 2, "n_groups": 1}),
])
def test_a_model_without_attention_is_refused_in_one_sentence(model_type, sizes):
    with pytest.raises(BadInputError, match=rf"'{model_type}' has no attention heads .*plan an attention model "
                                            "instead"):
        spec_from_config({"model_type": model_type, "hidden_size": 256, "num_hidden_layers": 2, "vocab_size": 1024,
                          **sizes}, f"state-spaces/{model_type}-tiny")


def test_a_model_that_needs_a_missing_package_names_it(monkeypatch, tiny_llama_config):
    from transformers import AutoModelForCausalLM

    def needs_timm(*args, **kwargs):
        raise ImportError("TimmWrapperModel requires the timm library but it was not found in your environment.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", needs_timm)
    with pytest.raises(BadInputError, match="lacks to build 'llama' .*timm library.*install it and plan again"):
        spec_from_config(tiny_llama_config, "tiny")


def test_a_config_transformers_rejects_is_one_sentence():
    with pytest.raises(BadInputError, match="transformers rejects this 'falcon_h1' config"):
        spec_from_config({"model_type": "falcon_h1", "hidden_size": 256, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "vocab_size": 1024, "time_step_limit": [0.0, "high"]}, "x")


def test_a_size_given_per_layer_plans_with_the_largest():
    """Gemma 3n gives intermediate_size per layer; the formulas take the largest layer's."""
    from hf_ftkit.planner.spec import dims_from_config

    assert dims_from_config({"model_type": "x", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                             "vocab_size": 10, "intermediate_size": [256, 512]})["intermediate_size"] == 512


def test_a_config_without_a_hidden_size_is_refused_in_one_sentence():
    from hf_ftkit.planner.spec import dims_from_config

    with pytest.raises(BadInputError, match="'blt' gives no hidden_size"):
        dims_from_config({"model_type": "blt", "num_hidden_layers": 2})
