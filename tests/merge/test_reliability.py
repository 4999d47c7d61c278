"""What a merge may touch: --overwrite never deletes inputs or user files, concurrent writers cannot both win,
killed runs leave nothing behind for long, and non-finite or inconsistent adapters are refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_ftkit.cli.main import main
from hf_ftkit.errors import BadInputError
from hf_ftkit.merge.output import MARKER, atomic_directory, remove_stale
from hf_ftkit.merge.run import merge_adapters
from tests.conftest import build_adapter


@pytest.fixture()
def workspace(tiny_model_dir, tmp_path) -> Path:
    """``s/base`` (a tiny model), ``s/adapter`` and a user's ``s/notes.txt``."""
    root = tmp_path / "s"
    shutil.copytree(tiny_model_dir, root / "base")
    build_adapter(root / "base", root / "adapter", 0, r=4, target_modules=["q_proj", "v_proj"])
    (root / "notes.txt").write_text("mine\n")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("out", ["s", ".", "s/base", "s/adapter"])
def test_overwrite_never_replaces_an_input_or_the_working_directory(workspace, capsys, monkeypatch, out):
    monkeypatch.chdir(workspace.parent if out != "." else workspace)
    base, adapter = ("base", "adapter") if out == "." else ("s/base", "s/adapter")
    before = snapshot(workspace)
    code, err = run_cli(["merge", base, adapter, "--out", out, "--overwrite", "--no-verify"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "--overwrite will not replace" in err and "Traceback" not in err
    assert snapshot(workspace) == before


def test_overwrite_refuses_a_directory_hf_ftkit_did_not_write(workspace, capsys, tmp_path):
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep\n")
    code, err = run_cli(["merge", str(workspace / "base"), str(workspace / "adapter"), "--out", str(other),
                         "--overwrite", "--no-verify"], capsys)
    assert code == 2 and "only replaces a directory hf-ftkit wrote" in err
    assert (other / "notes.txt").read_text() == "keep\n"


def test_overwrite_replaces_its_own_output(workspace, tmp_path):
    out = tmp_path / "merged"
    merge_adapters(workspace / "base", [workspace / "adapter"], out)
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "merge" and marker["mode"] == "in-memory"
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(BadInputError, match="already exists"):
        merge_adapters(workspace / "base", [workspace / "adapter"], out)
    merge_adapters(workspace / "base", [workspace / "adapter"], out, overwrite=True, dtype="fp16")
    assert (out / "model.safetensors").read_bytes() != first
    assert not list(tmp_path.glob(".merged.*"))  # no partial, retired copy or scratch left


def test_a_target_that_appears_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(BadInputError, match="appeared while this merge was writing"):
        with atomic_directory(target) as partial:
            (partial / "mine.txt").write_text("a")
            target.mkdir()  # another process committed first
            (target / "theirs.txt").write_text("b")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.slow  # a subprocess or a full docs rebuild: the whole suite (CI) runs it
def test_concurrent_merges_to_one_out_cannot_both_succeed(workspace, tmp_path):
    out = tmp_path / "merged"
    script = (f"import sys; from hf_ftkit.merge.run import merge_adapters\n"
              f"merge_adapters({str(workspace / 'base')!r}, [{str(workspace / 'adapter')!r}], {str(out)!r}, "
              f"verify=False)\n")
    runs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    codes = [r.wait(timeout=300) for r in runs]
    assert codes.count(0) == 1, [r.stderr.read() if r.stderr else "" for r in runs]
    assert (out / MARKER).is_file()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_killed_runs_are_cleaned_by_the_next_merge(workspace, tmp_path):
    host, pid = socket.gethostname(), dead_pid()
    stale_partial = tmp_path / f".other.partial-{host}-{pid}"
    stale_scratch = tmp_path / f".merged.hf-ftkit-scratch-{host}-{pid}"
    live_partial = tmp_path / f".other.partial-{host}-{os.getpid()}"  # a merge still running: kept
    foreign = tmp_path / f".other.partial-elsewhere-{pid}"  # another host's (shared disk): kept
    for folder in (stale_partial, stale_scratch, live_partial, foreign):
        folder.mkdir()
        (folder / "x.safetensors").write_bytes(b"0" * 100)
    merge_adapters(workspace / "base", [workspace / "adapter"], tmp_path / "merged", verify=False)
    assert not stale_partial.exists() and not stale_scratch.exists()
    assert live_partial.exists() and foreign.exists()


def test_an_output_retired_mid_replace_comes_back(tmp_path):
    host, pid = socket.gethostname(), dead_pid()
    retired = tmp_path / f".merged.replaced-{host}-{pid}"
    retired.mkdir()
    (retired / MARKER).write_text("{}")
    remove_stale(tmp_path)
    assert (tmp_path / "merged" / MARKER).is_file() and not retired.exists()


def test_scratch_lives_beside_the_output_not_in_tmp(workspace, tmp_path, monkeypatch):
    seen: list[Path] = []
    import hf_ftkit.merge.run as run

    original = run._merge_into_base

    def spy(base_dir, read, composition, out, adapter_dir, options):
        seen.append(adapter_dir)
        return original(base_dir, read, composition, out, adapter_dir, options)

    monkeypatch.setattr(run, "_merge_into_base", spy)
    merge_adapters(workspace / "base", [workspace / "adapter"], tmp_path / "merged", verify=False)
    assert seen[0].parent.parent == tmp_path and not seen[0].exists()


def poisoned(adapter: Path, tmp_path: Path, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / f"poisoned-{value}"
    shutil.copytree(adapter, copy)
    tensors = load_file(str(copy / "adapter_model.safetensors"))
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name][0, 0] = value
    save_file(tensors, str(copy / "adapter_model.safetensors"))
    return copy


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapters_are_refused_everywhere(workspace, tmp_path, capsys, value):
    bad = poisoned(workspace / "adapter", tmp_path, value)
    for args in (["merge", str(workspace / "base"), str(bad), "--out", str(tmp_path / "m"), "--no-verify"],
                 ["adapters", "inspect", str(bad)]):
        code, err = run_cli(args, capsys)
        assert code == 2 and "NaN or infinite" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_non_finite_weights_are_refused(workspace, tmp_path, capsys):
    code, err = run_cli(["merge", str(workspace / "base"), str(workspace / "adapter"), "--weights", "inf",
                         "--adapter-only", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "non-finite" in err
    assert not (tmp_path / "m").exists()


def test_a_nan_base_fails_verification_with_its_own_message(workspace, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "nanbase"
    shutil.copytree(workspace / "base", base)
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.norm.weight"][0] = float("nan")  # every logit
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    from hf_ftkit.errors import MergeVerificationError

    with pytest.raises(MergeVerificationError, match="not finite") as caught:
        merge_adapters(base, [workspace / "adapter"], tmp_path / "m")
    assert "tolerance" not in str(caught.value)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_tensors_outside_target_modules_are_refused_by_both_paths(workspace, tmp_path, streaming):
    adapter = tmp_path / "narrowed"
    shutil.copytree(workspace / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]  # the file still holds v_proj pairs
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BadInputError, match=r"v_proj, which its target_modules .* does not cover"):
        merge_adapters(workspace / "base", [adapter], tmp_path / "m", streaming=streaming)
    assert not (tmp_path / "m").exists()
    from hf_ftkit.merge.inspect import inspect_adapters

    assert not inspect_adapters([adapter]).compatible


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: ["not", "an", "object"], "not an object"),
        (lambda c: {**c, "r": "eight"}, "not a positive integer rank"),
        (lambda c: {**c, "r": 0}, "not a positive integer rank"),
        (lambda c: {**c, "lora_alpha": "x"}, "not a finite number"),
    ],
)
def test_malformed_adapter_configs_are_one_sentence(workspace, tmp_path, capsys, edit, message):
    adapter = tmp_path / "bad"
    shutil.copytree(workspace / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(edit(config)))
    code, err = run_cli(["merge", str(workspace / "base"), str(adapter), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_rank_mismatch_between_a_and_b_is_one_sentence(workspace, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "mismatch"
    shutil.copytree(workspace / "adapter", adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    code, err = run_cli(["merge", str(workspace / "base"), str(adapter), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "ranks disagree" in err


def test_serving_command_is_quoted_and_a_hostile_base_name_refused(workspace, tmp_path, capsys):
    import shlex

    adapter = tmp_path / "tenant a"  # a space in the path
    shutil.copytree(workspace / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B; touch /tmp/x #"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code = main(["adapters", "inspect", str(adapter), "--for", "vllm", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert "touch" not in report["serving"]["command"]
    assert any("neither a hub id nor a path" in f["message"] for f in report["findings"])
    config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    main(["adapters", "inspect", str(adapter), "--for", "vllm", "--json"])
    command = json.loads(capsys.readouterr().out)["serving"]["command"]
    words = shlex.split(command)
    assert words[2] == "meta-llama/Llama-3.1-8B" and f"tenant a={adapter}" in words


def test_overwrite_never_replaces_home_even_one_hf_ftkit_wrote(workspace, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / MARKER).write_text("{}")  # even a home that looks like an hf-ftkit output
    monkeypatch.setenv("HOME", str(home))
    code, err = run_cli(["merge", str(workspace / "base"), str(workspace / "adapter"), "--out", str(home),
                         "--overwrite", "--no-verify"], capsys)
    assert code == 2 and "your home" in err and (home / MARKER).is_file()


def test_qlora_merge_loads_the_base_in_its_stored_dtype_by_default(workspace, tmp_path, capsys):
    from hf_ftkit.merge.run import stored_dtype

    assert stored_dtype(workspace / "base") == torch.float32
    code = main(["merge", str(workspace / "base"), str(workspace / "adapter"), "--qlora", "dequantized",
                 "--out", str(tmp_path / "m"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verification"]["passed"]
    code, err = run_cli(["merge", str(workspace / "base"), str(workspace / "adapter"), "--qlora", "dequantized",
                         "--qlora-dtype", "bf16", "--tolerance", "0", "--out", str(tmp_path / "n")], capsys)
    assert code == 1 and "--qlora-dtype, bf16 was used" in err and not (tmp_path / "n").exists()


def test_written_files_follow_the_umask(workspace, tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        merge_adapters(workspace / "base", [workspace / "adapter"], tmp_path / "m", verify=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}
