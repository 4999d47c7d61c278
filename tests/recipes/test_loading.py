"""Recipe parsing: TRL keys, overrides, and every bad input as one sentence (exit 2, nothing started)."""

from __future__ import annotations

import pytest

from hf_ftkit.cli.main import main
from hf_ftkit.errors import BadInputError
from hf_ftkit.recipes import load_recipe
from hf_ftkit.recipes.run import train
from tests.recipes.conftest import DEMO, write_recipe


def test_demo_recipe_reads_trl_keys_and_command_line_overrides_win():
    recipe = load_recipe(DEMO, ["--learning_rate", "1e-4", "--max_steps=7", "--lora_r", "4"])
    assert recipe.training.learning_rate == pytest.approx(1e-4)
    assert recipe.training.max_steps == 7
    assert recipe.model.lora_r == 4
    assert recipe.model.use_peft and not recipe.model.load_in_4bit  # set from method: lora
    assert recipe.values["learning_rate"] == pytest.approx(1e-4)
    assert recipe.training.trust_remote_code is False


def test_yaml_numbers_written_without_a_dot_are_read_as_numbers(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model_name_or_path="gpt2", learning_rate="2e-4"))
    assert recipe.training.learning_rate == pytest.approx(2e-4)


def test_method_sets_trl_peft_and_quantization_keys(tmp_path):
    qlora = load_recipe(write_recipe(tmp_path / "q.yaml", model_name_or_path="gpt2", method="qlora"))
    assert qlora.model.use_peft and qlora.model.load_in_4bit
    full = load_recipe(write_recipe(tmp_path / "f.yaml", model_name_or_path="gpt2", method="full"))
    assert not full.model.use_peft and not full.model.load_in_4bit
    qdora = load_recipe(write_recipe(tmp_path / "qd.yaml", model_name_or_path="gpt2", method="qdora"))
    assert qdora.model.use_peft and qdora.model.load_in_4bit and qdora.model.use_dora
    from hf_ftkit.recipes.planning import plan_recipe

    planned = plan_recipe(qdora)  # the recipe key reaches the planner as QDoRA (DoRA on a 4-bit base)
    assert planned.setup.inputs.method == "qdora" and planned.setup.inputs.quantized_base


BAD = [
    ({"learnin_rate": 1e-4}, "unknown key 'learnin_rate' (did you mean 'learning_rate'?)"),
    ({"max_steps": "many"}, "max_steps expects int"),
    ({"max_steps": 2.5}, "max_steps expects an integer"),
    ({"lr_scheduler_type": "cosin"}, "did you mean 'cosine'?"),
    ({"method": "full", "load_in_4bit": True}, "load_in_4bit: True contradicts method: full"),
    ({"method": "auto", "use_peft": True}, "use_peft contradicts method: auto"),
    ({"method": "lora", "use_peft": False}, "use_peft: False contradicts method: lora"),
    ({"method": "full", "merge": True}, "merge: true needs an adapter"),
    ({"method": "sgd"}, "method: 'sgd' is not one of"),
    ({"hardware": "4x h1000"}, "unknown GPU 'h1000'"),
    ({"hardware": "4x h100", "shard": "none"}, "several GPUs but shard: none"),
    ({"forgetting_threshold": "kl"}, "is not metric=number"),
    ({"dataset_name": "./no/such/data.jsonl"}, "does not exist"),
    ({"model_name_or_path": "./no/such/model"}, "does not exist"),
    ({"load_in_8bit": True}, "load_in_8bit is not a recipe method"),
]


@pytest.mark.parametrize(("values", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_recipe_is_one_sentence_and_exit_2(tmp_path, capsys, values, message):
    path = write_recipe(tmp_path / "r.yaml", **{"model_name_or_path": "gpt2", **values})
    with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_recipe(path)
    assert main(["train", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-ftkit: error:") and "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_file_syntax_error_with_line_and_python_tags(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_name_or_path: gpt2\nlearning_rate: [1e-4\nmax_steps: 3\n")
    with pytest.raises(BadInputError, match=r"line \d+, column \d+: YAML syntax error"):
        load_recipe(broken)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("model_name_or_path: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(BadInputError, match="YAML"):
        load_recipe(tagged)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(BadInputError, match="is empty"):
        load_recipe(empty)


def test_unknown_command_line_flag_and_bad_value(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path="gpt2")
    with pytest.raises(BadInputError, match="command line: unknown key 'learning_rat'"):
        load_recipe(path, ["--learning_rat", "1"])
    with pytest.raises(BadInputError, match="command line"):
        load_recipe(path, ["--max_steps", "lots"])
    assert load_recipe(path, ["--no_remove_unused_columns"]).training.remove_unused_columns is False


def test_output_dir_holding_another_run_is_refused_before_loading_anything(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(tiny_model_dir), output_dir=str(out))
    with pytest.raises(BadInputError, match="already holds a run; pass --resume"):
        train(load_recipe(path))
    empty = tmp_path / "empty-out"
    path = write_recipe(tmp_path / "r2.yaml", model_name_or_path=str(tiny_model_dir), output_dir=str(empty))
    with pytest.raises(BadInputError, match="holds no checkpoint to resume from"):
        train(load_recipe(path), resume=True)
    with pytest.raises(BadInputError, match="resume_from_checkpoint: .* is not a checkpoint folder"):
        train(load_recipe(path, ["--resume_from_checkpoint", str(tmp_path / "nowhere")]))
    with pytest.raises(BadInputError, match="holds no checkpoint to resume from"):
        train(load_recipe(path, ["--resume_from_checkpoint", "true"]))


def test_gpu_recipe_validates_here_but_does_not_start_on_a_cpu_machine(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, wherever this runs
    path = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(tiny_model_dir), use_cpu=None, bf16=True)
    recipe = load_recipe(path)
    assert recipe.training.bf16 and not recipe.training.use_cpu
    with pytest.raises(BadInputError, match="add --use_cpu true --bf16 false"):
        train(recipe)
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_json(tmp_path, capsys):
    from tests.recipes.conftest import ROOT

    assert main(["train", "--config", str(ROOT / "recipes/qwen2.5/7b_auto_24gb.yaml"), "--dry-run", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["chosen"]["method"] in ("lora", "qlora", "full")
    assert [r["rung"] for r in data["ladder"]][0].startswith("full")


def test_recipe_that_does_not_fit_its_budget_exits_1_before_loading(tmp_path, capsys):
    from hf_ftkit.errors import DoesNotFitError

    recipe = load_recipe(DEMO, ["--budget", "1GiB", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(DoesNotFitError, match=r"more than 1GiB; use method: auto, fallback: true"):
        train(recipe)
    assert not (tmp_path / "out").exists()
    assert main(["train", "--config", str(DEMO), "--budget", "1GiB", "--dry-run"]) == 1
    assert main(["train", "--config", str(DEMO), "--budget", "1GiB", "--output_dir", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "more than 1GiB" in captured.err and "Traceback" not in captured.err


def test_demo_before_the_fetch_step_names_the_fetch_command(tmp_path, monkeypatch):
    import shutil

    from tests.recipes.conftest import DEMO

    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "demo.yaml"
    shutil.copy(DEMO, copy)
    with pytest.raises(BadInputError, match=r"run `python scripts/fetch_smollm2.py` once"):
        load_recipe(copy)
