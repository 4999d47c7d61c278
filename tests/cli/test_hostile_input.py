"""Every subcommand's flags with bad values: exit 2 with one line on stderr, no traceback, nothing new on disk."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from hf_ftkit.cli.main import main, make_parser
from tests.conftest import build_adapter

BAD_VALUES = ("-3", "0", "abc", "", "nan", "inf", "1e400", "/nonexistent/x", ".")


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    build_adapter(tiny_model_dir, root / "adapter", 0, r=4, target_modules=["q_proj"])
    (root / "heldout.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00" * 500)
    from tests.recipes.conftest import write_recipe

    recipe = write_recipe(root / "r.yaml", model_name_or_path=str(tiny_model_dir), output_dir=str(root / "run"))
    return {"model": tiny_model_dir, "adapter": root / "adapter", "heldout": root / "heldout.txt",
            "binary": root / "binary.bin", "binary_jsonl": root / "binary.jsonl", "recipe": recipe, "root": root}


def valid_argv(command: str, files: dict[str, Path], out: Path) -> list[str]:
    """A command line that works, cheap to run: the fuzz changes one flag of it."""
    return {
        "plan": ["plan", "meta-llama/Llama-3.1-8B", "--budget", "24GiB"],
        "compare": ["compare", "meta-llama/Llama-3.1-8B", "--gpu", "h100"],
        "merge": ["merge", str(files["model"]), str(files["adapter"]), "--out", str(out), "--adapter-only"],
        "adapters inspect": ["adapters", "inspect", str(files["adapter"])],
        "forgetting": ["forgetting", "--base", str(files["model"]), "--model", str(files["model"]), "--data",
                       str(files["heldout"]), "--max-tokens", "256", "--window", "64"],
        "train": ["train", "--config", str(files["recipe"]), "--dry-run"],
        "env": ["env"],
    }[command]


def value_flags() -> list[tuple[str, str]]:
    """(subcommand, flag) for every option that takes a value."""
    parser = make_parser()
    found = []

    def walk(name: str, p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}".strip(), sub)
            elif action.option_strings and action.nargs != 0 and action.dest != "help":
                found.append((name, action.option_strings[-1]))

    walk("", parser)
    return found


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)  # an exception escaping here is the traceback a user would see
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("command", "flag"), value_flags())
def test_every_flag_with_bad_values(command, flag, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a dataset id is looked up in the cache only: no minutes of retries
    out = tmp_path / "out"
    for value in BAD_VALUES:
        before = tree(files["root"]) | tree(tmp_path)
        argv = valid_argv(command, files, out)
        code, _, err = run([*argv, flag, value], capsys)
        assert code in (0, 1, 2), (flag, value, code)
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (flag, value, err)
            assert tree(files["root"]) | tree(tmp_path) == before, (flag, value)
        shutil.rmtree(out, ignore_errors=True)


def write_config(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096, **values}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _payload(marker: Path) -> bytes:
    """A pickle that runs a command when loaded without weights_only."""
    import pickle

    return pickle.dumps({"weight": _Exploit(marker)})


def cases(files: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Hostile inputs named in the reliability issue: argv and a word the one-line error must contain."""
    blocked = Path("/proc")  # unwritable even for root, who ignores permission bits
    (tmp / "afile").write_text("x")
    (tmp / "plotdir").mkdir()
    pickle_only = tmp / "pickled"
    shutil.copytree(files["model"], pickle_only)
    (pickle_only / "model.safetensors").rename(pickle_only / "pytorch_model.bin")
    remote = write_config(tmp / "remote", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"},
                          model_type="evil")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (files["model"] / name).is_file():
            shutil.copy(files["model"] / name, remote / name)
    (remote / "modeling_evil.py").write_text("import os\nos.system('touch " + str(tmp / "pwned") + "')\n")
    evil_adapter = tmp / "evil_adapter"
    shutil.copytree(files["adapter"], evil_adapter)
    (evil_adapter / "adapter_model.safetensors").unlink()
    (evil_adapter / "adapter_model.bin").write_bytes(_payload(tmp / "pwned"))
    evil_base = tmp / "evil_base"
    shutil.copytree(files["model"], evil_base)
    (evil_base / "model.safetensors").unlink()
    (evil_base / "pytorch_model.bin").write_bytes(_payload(tmp / "pwned"))
    merge = ["merge", str(files["model"]), str(files["adapter"])]
    forgetting = ["forgetting", "--data", str(files["heldout"])]
    return {
        "pickle_adapter": (["merge", str(files["model"]), str(evil_adapter), "--out", str(tmp / "o"),
                            "--allow-pickle"], "not a plain tensor file"),
        "pickle_base": (["merge", str(evil_base), str(files["adapter"]), "--out", str(tmp / "o"), "--allow-pickle"],
                        "not plain tensors"),
        "svd_rank": ([*merge, "--out", str(tmp / "o"), "--method", "ties_svd", "--svd-rank", "-3"], "--svd-rank"),
        "tolerance": ([*merge, "--out", str(tmp / "o"), "--tolerance", "-1"], "--tolerance"),
        "out_unwritable": ([*merge, "--out", str(blocked / "o")], "cannot write into"),
        "out_under_file": ([*merge, "--out", str(tmp / "afile" / "o")], "under the file"),
        "plan_negative_dim": (["plan", str(write_config(tmp / "neg", hidden_size=-256))], "hidden_size"),
        "plan_string_dim": (["plan", str(write_config(tmp / "str", num_hidden_layers="two"))], "num_hidden_layers"),
        "plan_binary_config": (["plan", str(files["binary"])], "not a JSON config.json"),
        "plot_directory": (["plan", "meta-llama/Llama-3.1-8B", "--plot", str(tmp / "plotdir")], "--plot"),
        "plot_unwritable": (["plan", "meta-llama/Llama-3.1-8B", "--plot", str(blocked / "p.png")], "--plot"),
        "forgetting_missing_model": ([*forgetting, "--base", str(files["model"]), "--model", str(tmp / "nope")],
                                     "--model"),
        "forgetting_base_not_model": ([*forgetting, "--base", str(tmp / "plotdir"), "--model", str(files["model"])],
                                      "--base"),
        "forgetting_binary_jsonl": (["forgetting", "--base", str(files["model"]), "--model", str(files["model"]),
                                     "--data", str(files["binary_jsonl"])], "binary.jsonl"),
        "forgetting_pickle_only": ([*forgetting, "--base", str(pickle_only), "--model", str(files["model"])],
                                   "pickle"),
        "forgetting_remote_code": ([*forgetting, "--base", str(remote), "--model", str(remote)], "--trust-remote-code"),
        "train_binary_config": (["train", "--config", str(files["binary"])], "--config"),
        "train_config_dir": (["train", "--config", str(tmp)], "is a directory"),
    }


def test_named_hostile_inputs_are_one_sentence_and_write_nothing(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, (argv, needle) in cases(files, tmp_path).items():
        before = tree(tmp_path) | tree(files["root"])
        code, _, err = run(argv, capsys)
        assert code == 2, (name, code, err)
        assert len(err.strip().splitlines()) == 1 and needle in err, (name, err)
        assert tree(tmp_path) | tree(files["root"]) == before, name
    assert not (tmp_path / "pwned").exists()
