from __future__ import annotations

import json

import pytest

from hf_ftkit.cli.main import main


@pytest.mark.slow
def test_merge_json_reports_composition_and_verification(smollm2_dir, adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    code = main(["merge", str(smollm2_dir), str(adapters["task_a"]), str(adapters["rslora"]), "--weights", "0.5",
                 "0.5", "--out", str(out), "--streaming", "--dtype", "bf16", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "streaming" and data["composition"]["exact"]
    assert data["composition"]["max_relative_error"] < 1e-6
    assert data["verification"]["passed"] and (out / "model.safetensors").is_file()


def test_merge_bad_input_is_one_line_exit_2(tiny_model_dir, tiny_adapters, tmp_path, capsys):
    code = main(["merge", str(tiny_model_dir), str(tiny_adapters["task_a"]), str(tiny_adapters["rslora"]),
                 "--method", "linear",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs equal ranks" in err
    assert not (tmp_path / "o").exists()
    assert main(["merge", str(tiny_model_dir), str(tiny_adapters["task_a"]), "--out", str(tmp_path / "o"),
                 "--method", "nope"]) == 2


def test_inspect_json_and_serving_verdicts(tiny_adapters, capsys):
    assert main(["adapters", "inspect", str(tiny_adapters["rslora"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    info = data["adapters"][0]
    assert info["use_rslora"] and info["r"] == 4 and info["scaling"] == pytest.approx(8 / 4**0.5)
    assert info["size_on_disk"] > 0 and info["trainable_params"] > 0 and data["compatible"]

    assert main(["adapters", "inspect", str(tiny_adapters["task_a"]), str(tiny_adapters["rslora"]), "--for", "vllm",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["serving"]["max_lora_rank"] == 8 and "--enable-lora" in data["serving"]["command"]

    assert main(["adapters", "inspect", str(tiny_adapters["dora"]), "--for", "vllm"]) == 1  # vLLM does not serve DoRA
    assert "DoRA" in capsys.readouterr().out
    assert main(["adapters", "inspect", str(tiny_adapters["head"]), "--for", "tgi", "--json"]) == 1  # modules_to_save
    # DoRA does not compose
    assert main(["adapters", "inspect", str(tiny_adapters["task_a"]), str(tiny_adapters["dora"])]) == 1


def test_inspect_checks_shapes_against_a_base(tiny_model_dir, tiny_adapters, capsys):
    assert main(["adapters", "inspect", str(tiny_adapters["embed"]), "--base", str(tiny_model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compatible"]
