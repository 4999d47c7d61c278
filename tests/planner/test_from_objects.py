import pytest
import torch

from hf_ftkit.errors import BadInputError, HfFtkitWarning
from hf_ftkit.planner.from_objects import inputs_from_training, plan_from_training


def test_sft_config_defaults_turn_on_checkpointing_and_bf16(tmp_path):
    from trl import SFTConfig

    inputs = inputs_from_training(SFTConfig(output_dir=str(tmp_path), use_cpu=True))
    assert inputs.gradient_checkpointing and inputs.precision == "bf16-mixed"
    assert inputs.seq_len == 1024 and inputs.batch_size == 8  # SFTConfig's own defaults


def test_training_arguments_defaults_do_not(tmp_path):
    from transformers import TrainingArguments

    inputs = inputs_from_training(TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    assert not inputs.gradient_checkpointing and inputs.precision == "fp32"
    assert inputs.optim == "adamw_torch_fused"


def test_lora_and_bnb_configs_become_qlora(tmp_path):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainingArguments

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                             bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    lora = LoraConfig(r=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, per_device_train_batch_size=2,
                             optim="paged_adamw_8bit")
    inputs = inputs_from_training(args, lora, bnb, seq_len=4096)
    assert (inputs.method, inputs.lora_r, inputs.lora_targets) == ("qlora", 32, "q_proj,v_proj")
    assert (inputs.quant_type, inputs.double_quant, inputs.quant_storage) == ("fp4", False, "bf16")
    assert (inputs.optim, inputs.batch_size, inputs.seq_len) == ("paged_adamw_8bit", 2, 4096)


def test_fp32_embeddings_of_a_quantized_model_mean_an_fp32_stream(tiny_llama_config):
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama_config), dtype=torch.bfloat16)
    bnb, lora = BitsAndBytesConfig(load_in_4bit=True), LoraConfig(r=8)
    assert not inputs_from_training(None, lora, bnb, model).kbit_upcast
    model.get_input_embeddings().float()  # what prepare_model_for_kbit_training does to every unquantized weight
    assert inputs_from_training(None, lora, bnb, model).kbit_upcast
    assert not inputs_from_training(None, lora, None, model).kbit_upcast  # a bf16/fp32 base is not "upcast"


def test_a_lora_config_without_targets_plans_peft_default_targets(tiny_llama_config):
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama_config), dtype=torch.bfloat16)
    assert inputs_from_training(None, LoraConfig(r=8), model=model).lora_targets == "q_proj,v_proj"  # PEFT's llama
    with pytest.warns(HfFtkitWarning, match="traced with 1 and 2 decoder layers"):
        planned = plan_from_training("openai-community/gpt2", None, LoraConfig(r=8), seq_len=128)
    assert planned.inputs.lora_targets == "c_attn"  # read from the resolved model's type
    with pytest.raises(BadInputError, match="no default for model type phi3"):  # as PEFT refuses it
        plan_from_training("microsoft/Phi-3-mini-4k-instruct", None, LoraConfig(r=8), seq_len=128)


def test_bnb_without_lora_is_refused():
    from transformers import BitsAndBytesConfig

    with pytest.raises(BadInputError, match="LoraConfig"):
        inputs_from_training(bnb_config=BitsAndBytesConfig(load_in_4bit=True))


def test_plan_from_a_real_model_object(tmp_path, tiny_llama_config):
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama_config), dtype=torch.bfloat16)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True)
    full = plan_from_training(model, args, seq_len=128)
    assert full.inputs.precision == "bf16"  # a bf16-loaded model keeps bf16 weights and states
    assert full.model.params_total == sum(p.numel() for p in model.parameters())
    lora = plan_from_training(model, args, LoraConfig(r=8, target_modules="all-linear"), seq_len=128, budget="1GiB")
    assert lora.fits and lora.peak_bytes < full.peak_bytes


def test_deepspeed_config_is_read(tmp_path):
    from types import SimpleNamespace

    ds = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    args = SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=4, gradient_checkpointing=True,
                           optim="adamw_torch", bf16=True, fp16=False, deepspeed=ds, fsdp=None, world_size=8)
    inputs = inputs_from_training(args, seq_len=2048)
    assert (inputs.shard, inputs.offload, inputs.gpus) == ("zero3", "optimizer", 8)


def test_a_dict_of_sft_fields_plans_a_gpu_run_on_a_cpu_only_machine(monkeypatch):
    from peft import LoraConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # planning must not depend on local hardware
    plan = plan_from_training("meta-llama/Llama-3.1-8B", {"per_device_train_batch_size": 4},
                              LoraConfig(r=16, target_modules="all-linear"), budget="24GiB")
    assert plan.inputs.precision == "bf16-mixed" and plan.inputs.gradient_checkpointing
    assert plan.inputs.batch_size == 4 and plan.inputs.seq_len == 1024 and plan.inputs.method == "lora"
    with pytest.raises(BadInputError, match="not valid SFTConfig fields"):
        plan_from_training("meta-llama/Llama-3.1-8B", {"per_device_batch": 4})


@pytest.mark.parametrize(("method", "bf16", "loaded", "expected"), [
    ("full", True, None, "bf16-mixed"),  # fp32 master weights under autocast (model not given)
    ("full", True, "bf16", "bf16"),  # a bf16 model keeps weights and optimizer states in bf16
    ("full", False, "fp32", "fp32"),
    ("lora", True, "bf16", "bf16-mixed"),
    ("lora", False, "bf16", "bf16"),
    ("lora", True, "fp32", "fp32"),  # fp32 base weights: planned as fp32, never as a 16-bit base
    ("qlora", True, "fp32", "bf16-mixed"),
    ("qdora", False, "bf16", "bf16"),
])
def test_one_precision_rule_for_trainer_objects_and_recipes(method, bf16, loaded, expected):
    from hf_ftkit.planner.from_objects import plan_precision

    assert plan_precision(method, bf16, False, loaded) == expected


def test_recipes_use_the_same_precision_rule(tmp_path):
    from hf_ftkit.planner.from_objects import plan_precision
    from hf_ftkit.recipes.loading import load_recipe
    from hf_ftkit.recipes.planning import plan_recipe
    from tests.recipes.conftest import write_recipe

    for dtype, bf16 in (("bfloat16", True), ("float32", True), ("bfloat16", False)):
        recipe = load_recipe(write_recipe(tmp_path / f"{dtype}{bf16}.yaml", model_name_or_path="gpt2",
                                          dtype=dtype, bf16=bf16))
        loaded = "bf16" if dtype == "bfloat16" else "fp32"
        assert plan_recipe(recipe).setup.inputs.precision == plan_precision("lora", bf16, False, loaded)


def test_a_recipe_loading_a_4bit_base_in_fp32_keeps_an_fp32_stream(tmp_path):
    from hf_ftkit.recipes.loading import load_recipe
    from hf_ftkit.recipes.planning import plan_recipe
    from tests.recipes.conftest import write_recipe

    for dtype, upcast in (("float32", True), ("bfloat16", False)):
        recipe = load_recipe(write_recipe(tmp_path / f"{dtype}.yaml", model_name_or_path="Qwen/Qwen2.5-0.5B",
                                          dtype=dtype, bf16=True, load_in_4bit=True, method="qlora"))
        assert plan_recipe(recipe).setup.inputs.kbit_upcast is upcast


def test_adapter_dtype_is_what_the_trainer_makes_of_the_adapters(tmp_path, tiny_llama_config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments
    from trl import SFTConfig

    bnb, lora = BitsAndBytesConfig(load_in_4bit=True), LoraConfig(r=8, target_modules="all-linear")
    sft = SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    # TRL's SFTTrainer casts a 4-bit base's adapters to bf16; Trainer leaves PEFT's fp32
    assert inputs_from_training(sft, lora, bnb).adapter_dtype == "bf16"
    assert inputs_from_training(plain, lora, bnb).adapter_dtype == "fp32"
    assert inputs_from_training(sft, lora).adapter_dtype == "fp32"
    # a PeftModel says it itself
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama_config), dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    assert inputs_from_training(plain, lora, None, peft_model).adapter_dtype == "bf16"
    assert inputs_from_training(plain, None, None, peft_model).adapter_dtype == "fp32"  # no LoraConfig: full


@pytest.mark.parametrize(("value", "expected"), [
    ("eager", "eager"), ("sdpa", "sdpa"), ("flash_attention_2", "flash_attention_2"),
    ("flash_attention_3", "flash_attention_2"), ("kernels-community/flash-attn", "flash_attention_2"),
    ("flex_attention", "sdpa"), (None, None),
])
def test_transformers_attention_names_map_to_the_planners(value, expected):
    from hf_ftkit.planner.from_objects import attention_name

    assert attention_name(value) == expected


def test_the_models_attention_is_planned(tiny_llama_config):
    # eager keeps every layer's S x S attention weights: a model loaded with it (or a TRL config that will load it
    # so) was planned as sdpa
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_ftkit.planner.structure import config_from_dict
    from hf_ftkit.planner.trace import trace_step

    args = {"per_device_train_batch_size": 1, "gradient_checkpointing": False}
    lora = LoraConfig(r=8, target_modules="all-linear")
    plans = {}
    for impl in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llama_config), attn_implementation=impl)
        plans[impl] = plan_from_training(model, args, lora, seq_len=2048)
        assert plans[impl].inputs.attn_implementation == impl
        assert plan_from_training(get_peft_model(model, lora), args, seq_len=2048).inputs.attn_implementation == impl
    # an fp32 model: each of the 2 layers keeps its 8 heads' 2048 x 2048 fp32 attention weights once, and the
    # softmax's backward holds two more such tensors: as much more as traced steps of the same runs hold
    traced = {impl: trace_step(config_from_dict(dict(tiny_llama_config)), plans[impl].inputs).peak_bytes
              for impl in plans}
    more = plans["eager"].allocated_peak_bytes - plans["sdpa"].allocated_peak_bytes
    assert more == pytest.approx(traced["eager"] - traced["sdpa"], rel=0.02) and more > 3 * 8 * 2048**2 * 4
    trl_args = dict(args, model_init_kwargs={"attn_implementation": "eager"})
    named = plan_from_training("meta-llama/Llama-3.2-1B", trl_args, lora, seq_len=4096)
    assert named.inputs.attn_implementation == "eager"
    assert plan_from_training("meta-llama/Llama-3.2-1B", args, lora).inputs.attn_implementation == "sdpa"


def test_a_recipe_plans_the_attention_it_loads(tmp_path):
    from hf_ftkit.recipes.loading import load_recipe
    from hf_ftkit.recipes.planning import plan_recipe
    from tests.recipes.conftest import write_recipe

    peaks = {}
    for impl in ("eager", "sdpa"):
        recipe = load_recipe(write_recipe(tmp_path / f"{impl}.yaml", model_name_or_path="Qwen/Qwen2.5-0.5B",
                                          attn_implementation=impl, max_length=4096, gradient_checkpointing=False))
        rp = plan_recipe(recipe)
        assert rp.setup.inputs.attn_implementation == impl
        peaks[impl] = rp.plan.peak_bytes
    assert peaks["eager"] > peaks["sdpa"]


@pytest.mark.parametrize(("fields", "packing", "padding_free"), [
    ({"packing": True}, True, False),  # BFD, TRL's default: padding-free rows of packed sequences
    ({"packing": True, "packing_strategy": "bfd_split"}, True, False),
    ({"packing": True, "packing_strategy": "wrapped"}, False, False),  # full rows, no padding: planned padded
    ({"padding_free": True}, False, True),
])
def test_trls_packing_strategy_decides_how_the_batch_is_planned(tmp_path, fields, packing, padding_free):
    from trl import SFTConfig

    inputs = inputs_from_training(SFTConfig(output_dir=str(tmp_path), use_cpu=True, **fields))
    assert (inputs.packing, inputs.padding_free) == (packing, padding_free)
