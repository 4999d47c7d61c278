"""Every bad input: one clear sentence, nothing written, no partial output left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_ftkit.errors import BadInputError, MergeVerificationError
from hf_ftkit.merge.run import merge_adapters
from tests.conftest import build_adapter


def nothing_written(parent: Path, name: str = "out") -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.partial-*"))


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory, tiny_llama_config) -> Path:
    """A LoRA trained on another base (the tiny Llama of the test config)."""
    from transformers import AutoModelForCausalLM

    from hf_ftkit.planner.structure import config_from_dict

    root = tmp_path_factory.mktemp("foreign")
    AutoModelForCausalLM.from_config(config_from_dict(tiny_llama_config)).save_pretrained(root / "base")
    return build_adapter(root / "base", root / "adapter", 0, r=4, target_modules=["q_proj"])


def corrupt(adapter: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "corrupt"
    shutil.copytree(adapter, copy)
    weights = copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return copy


def test_adapter_for_another_base(tiny_model_dir, foreign_adapter, tmp_path):
    with pytest.raises(BadInputError, match="trained on another base"):
        merge_adapters(tiny_model_dir, [foreign_adapter], tmp_path / "out")
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_config", "no adapter_config.json"),
        ("corrupt", "truncated"),
        ("weights_mismatch", "2 weights for 1 adapters"),
        ("unknown_method", "unknown method"),
        ("pickle", "pickle weights"),
        ("missing_dir", "does not exist"),
    ],
)
def test_bad_input_writes_nothing(tiny_model_dir, tiny_adapters, tmp_path, case, message):
    adapter, kwargs = tiny_adapters["task_a"], {}
    if case == "missing_config":
        adapter = tmp_path / "noconfig"
        shutil.copytree(tiny_adapters["task_a"], adapter)
        (adapter / "adapter_config.json").unlink()
    elif case == "corrupt":
        adapter = corrupt(tiny_adapters["task_a"], tmp_path)
    elif case == "weights_mismatch":
        kwargs = {"weights": [1.0, 2.0]}
    elif case == "unknown_method":
        kwargs = {"method": "mean"}
    elif case == "pickle":
        import torch
        from safetensors.torch import load_file

        adapter = tmp_path / "pickled"
        shutil.copytree(tiny_adapters["task_a"], adapter)
        torch.save(load_file(str(adapter / "adapter_model.safetensors")), adapter / "adapter_model.bin")
        (adapter / "adapter_model.safetensors").unlink()
    elif case == "missing_dir":
        adapter = tmp_path / "nope"
    with pytest.raises(BadInputError, match=message) as info:
        merge_adapters(tiny_model_dir, [adapter], tmp_path / "out", **kwargs)
    assert "\n" not in str(info.value)
    assert nothing_written(tmp_path)


def test_pickle_adapter_accepted_with_allow_pickle(tiny_model_dir, tiny_adapters, tmp_path):
    import torch
    from safetensors.torch import load_file

    adapter = tmp_path / "pickled"
    shutil.copytree(tiny_adapters["rslora"], adapter)
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    result = merge_adapters(tiny_model_dir, [adapter], tmp_path / "out", allow_pickle=True, streaming=True)
    assert result.verification["passed"] and not list((tmp_path / "out").glob("*.bin"))


def test_existing_output_is_kept_without_overwrite(tiny_model_dir, tiny_adapters, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="already exists; pass --overwrite"):
        merge_adapters(tiny_model_dir, [tiny_adapters["rslora"]], out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(BadInputError, match="only replaces a directory hf-ftkit wrote"):
        merge_adapters(tiny_model_dir, [tiny_adapters["rslora"]], out, overwrite=True, streaming=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    merge_adapters(tiny_model_dir, [tiny_adapters["rslora"]], out, overwrite=True, streaming=True)
    assert (out / "model.safetensors").is_file()


def test_full_disk_is_refused_before_writing(tiny_model_dir, tiny_adapters, tmp_path, monkeypatch):
    import hf_ftkit.merge.output as output

    real = shutil.disk_usage
    monkeypatch.setattr(output.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=10 * 2**20))
    with pytest.raises(BadInputError, match="free but the output needs"):
        merge_adapters(tiny_model_dir, [tiny_adapters["rslora"]], tmp_path / "out", streaming=True)
    assert nothing_written(tmp_path)


def test_disk_filling_up_mid_write_leaves_nothing(tiny_model_dir, tiny_adapters, tmp_path, monkeypatch):
    import errno

    import hf_ftkit.merge._stream_io as stream_io

    calls = {"n": 0}
    original = stream_io.ShardWriter.write_tensor

    def fill_up(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, tensor)

    monkeypatch.setattr(stream_io.ShardWriter, "write_tensor", fill_up)
    with pytest.raises(BadInputError, match="disk filled up"):
        merge_adapters(tiny_model_dir, [tiny_adapters["task_a"]], tmp_path / "out", streaming=True)
    assert nothing_written(tmp_path)


def test_failed_verification_writes_nothing(tiny_model_dir, tiny_adapters, tmp_path):
    with pytest.raises(MergeVerificationError, match="nothing was written"):
        merge_adapters(tiny_model_dir, [tiny_adapters["task_a"]], tmp_path / "out", dtype="bf16", tolerance=1e-9)
    assert nothing_written(tmp_path)


def test_quantized_base_is_refused(tiny_model_dir, tiny_adapters, tmp_path):
    base = tmp_path / "base4bit"
    base.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInputError, match="bitsandbytes-quantized"):
        merge_adapters(base, [tiny_adapters["task_a"]], tmp_path / "out")
    assert nothing_written(tmp_path)


INTERRUPTED = """
import sys
from hf_ftkit.merge.run import merge_adapters
merge_adapters(sys.argv[1], [sys.argv[2]], sys.argv[3], streaming=True, verify=False, max_shard_bytes=20_000_000)
"""


@pytest.mark.slow  # needs a base large enough to be written in several shards while the test watches
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_streaming_merge_killed_between_shards_leaves_no_output(smollm2_dir, adapters, tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, str(smollm2_dir), str(adapters["task_a"]), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*/model-00002-*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    assert not out.exists()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    if sig == signal.SIGTERM:
        assert not leftovers  # cleaned up on the way out
    else:  # SIGKILL cannot be caught: the next run to the same target removes the dead run's partial dir
        assert leftovers
        merge_adapters(smollm2_dir, [adapters["rslora"]], out, streaming=True, verify=False)
        assert out.is_dir() and not list(tmp_path.glob(".out.partial-*"))


def test_merge_options_come_in_one_config_or_as_keywords_not_both(tmp_path):
    from hf_ftkit.merge.config import MergeConfig

    with pytest.raises(BadInputError, match="not both"):
        merge_adapters(tmp_path / "base", [tmp_path / "a"], tmp_path / "out", MergeConfig(), dtype="bf16")
    with pytest.raises(BadInputError, match="MergeConfig's fields"):
        merge_adapters(tmp_path / "base", [tmp_path / "a"], tmp_path / "out", dtypee="bf16")
    with pytest.raises(BadInputError, match="--density 2"):
        MergeConfig(density=2)
    assert not (tmp_path / "out").exists()


def test_an_all_linear_config_covers_every_linear_pair_but_the_output_layer(tiny_adapters, tmp_path):
    import json as _json

    from hf_ftkit.merge.adapters import read_adapter

    copy = tmp_path / "all_linear"
    shutil.copytree(tiny_adapters["task_a"], copy)
    config = _json.loads((copy / "adapter_config.json").read_text())
    config["target_modules"] = "all-linear"  # as a hand-written config says it; PEFT expands it on load
    (copy / "adapter_config.json").write_text(_json.dumps(config))
    assert read_adapter(copy).uncovered_modules() == []
    embed = tmp_path / "embed_all_linear"
    shutil.copytree(tiny_adapters["embed"], embed)
    config = _json.loads((embed / "adapter_config.json").read_text())
    config["target_modules"] = "all-linear"
    (embed / "adapter_config.json").write_text(_json.dumps(config))
    assert read_adapter(embed).uncovered_modules() == ["model.embed_tokens"]  # not a linear: PEFT skips it
