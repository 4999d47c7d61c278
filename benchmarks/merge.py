"""Streaming merge vs PEFT ``merge_and_unload`` + ``save_pretrained`` on a synthetic Llama-shaped checkpoint.

Builds a sharded bf16 safetensors checkpoint with random weights in the shape of Llama-3.2-3B (``--size 8b``
for Llama-3.1-8B, ~16 GB) and a rank-16 all-linear LoRA adapter, then merges it (a) with PEFT and (b) with
hf-ftkit's streaming merge, each in its own process; reports wall time and peak RSS (``ru_maxrss``) and
checks the two outputs tensor by tensor. Writes ``docs/benchmarks/merge.md``.

    python benchmarks/merge.py [--size 3b|8b] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hf_ftkit.units import format_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from freshness import stamp  # noqa: E402  (a sibling script, not a package)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
MODELS = {"3b": "meta-llama/Llama-3.2-3B", "8b": "meta-llama/Llama-3.1-8B"}
RANK = 16

PEFT_MERGE = """
import json, resource, sys, time, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size="5GB")
print(json.dumps({"seconds": time.perf_counter() - start,
                  "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
STREAMING_MERGE = """
import json, resource, sys, time
from hf_ftkit.merge.run import merge_adapters
base, adapter, out = sys.argv[1:4]
start = time.perf_counter()
merge_adapters(base, [adapter], out, streaming=True, verify=False)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def build_checkpoint(model_id: str, directory: Path) -> dict:
    """Random bf16 weights (std 0.02, norms 1), 5 GB shards, written one tensor at a time."""
    import torch

    from hf_ftkit.merge._stream_io import OutTensor, ShardWriter, shard_names, split_shards
    from hf_ftkit.planner.resolve import catalog_entry
    from hf_ftkit.planner.structure import build_meta_model, config_from_dict

    entry = catalog_entry(model_id)
    assert entry is not None
    config = dict(entry["config"])
    model = build_meta_model(config_from_dict(config))
    tensors = [OutTensor(name, torch.bfloat16, tuple(p.shape)) for name, p in model.named_parameters()
               if not (config.get("tie_word_embeddings") and name == "lm_head.weight")]
    shards = split_shards(tensors, 5 * 10**9)
    files = shard_names(len(shards))
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for file, shard in zip(files, shards, strict=True):
        writer = ShardWriter(directory / file, shard)
        for tensor in shard:
            value = torch.ones(tensor.shape) if len(tensor.shape) == 1 else torch.randn(tensor.shape,
                                                                                         generator=generator) * 0.02
            writer.write_tensor(tensor.name, value.to(torch.bfloat16))
            weight_map[tensor.name] = file
        writer.close()
    total = sum(t.nbytes for t in tensors)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"],
                                                       "dtype": "bfloat16"}))
    return {"params": sum(p.numel() for p in model.parameters()), "bytes": total, "shards": len(files)}


def build_adapter(model_id: str, directory: Path) -> int:
    """A rank-16 LoRA on every linear layer of the decoder (random A and B, so ΔW ≠ 0)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from hf_ftkit.planner.resolve import catalog_entry
    from hf_ftkit.planner.structure import build_meta_model, config_from_dict

    entry = catalog_entry(model_id)
    assert entry is not None
    model = build_meta_model(config_from_dict(dict(entry["config"])))
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, module.in_features, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, RANK, generator=generator) * 0.01
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    config.base_model_name_or_path = model_id
    config.save_pretrained(str(directory))
    return sum(t.numel() for t in tensors.values())


def run(script: str, *args: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"merge process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def identical(first: Path, second: Path) -> tuple[bool, int]:
    """Tensor-by-tensor equality of two checkpoints (shard layouts may differ)."""
    import torch

    from hf_ftkit.merge._stream_io import base_entries, read_tensor

    a, b = base_entries(first), base_entries(second)
    if set(a) != set(b):
        return False, 0
    return all(torch.equal(read_tensor(a[n]), read_tensor(b[n])) for n in a), len(a)


def stage(args: argparse.Namespace) -> None:
    """The heavy steps, each run in a child process of the lean parent."""
    work, model_id = args.workdir, MODELS[args.size]
    if args.stage == "build":
        (work / "base").mkdir()
        info = build_checkpoint(model_id, work / "base")
        info["adapter_params"] = build_adapter(model_id, work / "adapter")
        print(json.dumps(info))
    else:
        same, count = identical(work / "peft", work / "streaming")
        print(json.dumps({"same": same, "count": count}))


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(MODELS), default="3b")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--stage", choices=("build", "compare"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        stage(args)
        return
    work = Path(tempfile.mkdtemp(prefix="hf-ftkit-merge-bench-", dir=args.workdir))
    model_id = MODELS[args.size]
    this = [sys.executable, __file__, "--size", args.size, "--workdir", str(work), "--stage"]
    try:
        started = time.perf_counter()
        info = json.loads(subprocess.run([*this, "build"], check=True, capture_output=True, text=True).stdout)
        print(f"built {model_id}-shaped checkpoint: {info['params']:,} params, {format_bytes(info['bytes'])} in "
              f"{info['shards']} shards; adapter {info['adapter_params']:,} params "
              f"({time.perf_counter() - started:.0f} s)")
        peft = run(PEFT_MERGE, work / "base", work / "adapter", work / "peft")
        streaming = run(STREAMING_MERGE, work / "base", work / "adapter", work / "streaming")
        check = json.loads(subprocess.run([*this, "compare"], check=True, capture_output=True, text=True).stdout)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(model_id, info, info["adapter_params"], peft, streaming, check["same"], check["count"])


def report(model_id: str, info: dict, adapter_params: int, peft: dict, streaming: dict, same: bool,
           count: int) -> None:
    rss_ratio = streaming["maxrss_bytes"] / peft["maxrss_bytes"]
    time_ratio = streaming["seconds"] / peft["seconds"]
    rows = [
        ("PEFT merge_and_unload + save_pretrained", peft),
        ("hf-ftkit streaming merge", streaming),
    ]
    lines = [
        "# Merge benchmark: streaming vs PEFT",
        "",
        f"Synthetic {model_id}-shaped checkpoint: {info['params']:,} parameters, random bf16 weights, "
        f"{format_bytes(info['bytes'])} in {info['shards']} safetensors shards of at most 5 GB; a rank-{RANK} "
        f"LoRA on every decoder linear layer ({adapter_params:,} parameters, float32). Each merge runs in its own "
        "process started from a parent that never imports torch (Linux carries `ru_maxrss` across fork+exec, so a "
        "heavy parent would set a floor under its children's figure); peak RSS is that process's `ru_maxrss`. "
        "Machine: 2 CPU cores, 24 GiB RAM.",
        "",
        "| merge | wall time (s) | peak RSS |",
        "|---|---:|---:|",
        *[f"| {name} | {r['seconds']:.1f} | {format_bytes(r['maxrss_bytes'])} |" for name, r in rows],
        "",
        f"- streaming / PEFT peak RSS: **{rss_ratio:.1%}** (target ≤ 25%)",
        f"- streaming / PEFT wall time: **{time_ratio:.2f}×** (target ≤ 1.0×)",
        f"- output tensors identical: **{'yes' if same else 'NO'}** ({count} tensors compared with `torch.equal`)",
        "",
        "Command: `python benchmarks/merge.py" + ("" if "3.2-3B" in model_id else " --size 8b") + "`, at commit "
        f"`{_commit()}` on {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "merge.md").write_text(text.rstrip("\n") + "\n\n" + stamp("merge.md") + "\n")


if __name__ == "__main__":
    main()
