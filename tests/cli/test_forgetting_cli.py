from __future__ import annotations

import json

import pytest

from hf_ftkit.cli.main import main


@pytest.fixture(scope="module")
def heldout_dir(tmp_path_factory, heldout_texts):
    directory = tmp_path_factory.mktemp("heldout")
    for i, text in enumerate(heldout_texts[:6]):
        (directory / f"doc{i}.txt").write_text(text)
    return directory


@pytest.mark.slow
def test_forgetting_json_for_an_adapter_and_for_the_base_itself(smollm2_dir, adapters, heldout_dir, capsys):
    common = ["--data", str(heldout_dir), "--max-tokens", "600", "--window", "128", "--json"]
    assert main(["forgetting", "--base", str(smollm2_dir), "--model", str(adapters["rslora"]), *common]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["base"]) == {"bits_per_byte", "byte_perplexity", "word_perplexity", "token_perplexity"}
    assert data["kl"] > 0 and 0 < data["top1_agreement"] <= 1 and data["tokens"] >= 600 and data["documents"] >= 1
    assert main(["forgetting", "--base", str(smollm2_dir), "--model", str(smollm2_dir), *common]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["kl"] == pytest.approx(0, abs=1e-9) and same["top1_agreement"] == 1
    assert all(v == 0 for v in same["delta_pct"].values())


def test_forgetting_bad_data_is_exit_2(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = str(tiny_model_dir)
    assert main(["forgetting", "--base", base, "--model", base, "--data", str(empty)]) == 2
    assert "holds no" in capsys.readouterr().err
    (tmp_path / "rows.jsonl").write_text('{"body_text": "x"}\n')
    code = main(["forgetting", "--base", str(tiny_model_dir), "--model", str(tiny_model_dir), "--data",
                 str(tmp_path / "rows.jsonl"), "--column", "text"])
    assert code == 2 and "no column 'text'" in capsys.readouterr().err
