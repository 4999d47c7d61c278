"""Merging an adapter into a base checkpoint tensor by tensor, with RAM bounded by the largest tensor.

Each targeted weight becomes ``W + scaling · B @ A`` in float32 (DoRA: rescaled by PEFT's own weight-norm
code), cast to the output dtype, exactly as PEFT's ``merge_and_unload`` computes it; untouched tensors are
copied as raw bytes (or converted in row blocks). Output shards are written one at a time with their index.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from hf_ftkit.errors import BadInputError
from hf_ftkit.merge._stream_io import (
    OutTensor,
    ShardWriter,
    TensorEntry,
    base_entries,
    read_tensor,
    shard_names,
    split_shards,
)
from hf_ftkit.merge.adapters import PREFIX, Adapter, LoraModule
from hf_ftkit.merge.base import read_config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md", ".gitattributes"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
_ROW_BLOCK_BYTES = 64 * 1024 * 1024
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class QloraTarget:
    """A QLoRA adapter's merge target and the 4-bit setup it was trained with.

    ``dequantized`` writes ``dequant(quant(W)) + ΔW`` for every linear the 4-bit base quantized, reproducing what
    the adapter was trained against; ``original`` writes ``W + ΔW`` on the 16-bit base. Both are reported
    against the 4-bit training model.
    """

    target: Literal["dequantized", "original"] = "dequantized"
    quant_type: str = "nf4"
    double_quant: bool = False
    load_dtype: torch.dtype = torch.bfloat16  # the dtype the base was loaded in before quantization


@dataclass
class MergePlan:
    """What a merge writes: output tensors in order, what changes each, and the config edits."""

    outputs: list[OutTensor]
    sources: dict[str, TensorEntry | None]  # output name -> base tensor it starts from (None: adapter-supplied)
    modules: dict[str, LoraModule]  # output weight name -> low-rank update
    replacements: dict[str, torch.Tensor]  # output name -> whole tensor from the adapter
    quantized: set[str] = field(default_factory=set)  # output names that go through dequant(quant(W))
    config_updates: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


def plan_merge(base_dir: Path, adapter: Adapter, dtype: torch.dtype | None, qlora: QloraTarget | None) -> MergePlan:
    """Match the adapter to the base checkpoint and decide every output tensor, before anything is written."""
    config = read_config(base_dir)
    entries = base_entries(base_dir)
    modules = {f"{name}.weight": module for name, module in adapter.modules().items()}
    full = adapter.full_tensors()
    base_layer = {k.replace(".base_layer.", "."): v for k, v in _base_layer_tensors(adapter).items()}
    module_level = {k: v for k, v in full.items() if k not in base_layer}
    _check_targets(entries, modules, full, adapter)
    in_name, out_name, tied = _embedding_names(config)
    for name in full:
        if name not in entries and not (tied and name == out_name):
            raise BadInputError(
                f"the adapter {adapter.path} carries {name}, which the base checkpoint does not have: "
                "it was trained on another base; pass that base."
            )
    touched = set(modules) | set(module_level)
    untie = tied and bool({in_name, out_name} & touched)
    sources: dict[str, TensorEntry | None] = dict(entries)
    names = list(entries)
    if untie and out_name not in entries:
        names.append(out_name)
        sources[out_name] = entries[in_name]
    replacements = {**{n: t for n, t in base_layer.items() if n in sources}, **module_level}
    if untie and out_name not in module_level and in_name in base_layer:
        replacements[out_name] = base_layer[in_name]  # the resized embedding was the tied output weight too
    outputs = []
    for name in names:
        source = sources[name]
        replaced = replacements.get(name)
        shape = tuple(replaced.shape) if replaced is not None else source.shape  # type: ignore[union-attr]
        stored = source.dtype if source is not None else replacements[name].dtype
        out_dtype = dtype if dtype is not None and stored.is_floating_point else stored
        outputs.append(OutTensor(name, out_dtype, shape))
    updates: dict[str, Any] = {}
    if untie:
        updates["tie_word_embeddings"] = False
    if in_name in replacements and int(replacements[in_name].shape[0]) != config.get("vocab_size"):
        updates["vocab_size"] = int(replacements[in_name].shape[0])
    quantized = quantized_weights(config, names) if qlora and qlora.target == "dequantized" else set()
    return MergePlan(outputs, sources, modules, replacements, quantized, updates)


def base_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the base's tensors by name, including a tied output embedding the checkpoint leaves out."""
    shapes = {name: entry.shape for name, entry in base_entries(base_dir).items()}
    in_name, out_name, tied = _embedding_names(read_config(base_dir))
    if tied and out_name not in shapes and in_name in shapes:
        shapes[out_name] = shapes[in_name]
    return shapes


def _base_layer_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v for k, v in adapter.tensors().items() if ".base_layer." in k}


def _check_targets(entries: dict[str, TensorEntry], modules: dict[str, LoraModule], full: dict[str, Any],
                   adapter: Adapter) -> None:
    for name, module in modules.items():
        entry = entries.get(name)
        if entry is None:
            raise BadInputError(
                f"the adapter {adapter.path} updates {name}, which the base checkpoint does not have: "
                "it was trained on another base; pass that base."
            )
        expected = tuple(module.delta_shape())
        resized = module.kind == "embedding" and name in full
        if entry.shape != expected and not resized:
            raise BadInputError(
                f"the adapter {adapter.path} expects {name} of shape {expected}, the base has {entry.shape}: "
                "it was trained on another base; pass that base."
            )
        if module.kind == "embedding" and module.magnitude is not None:
            raise BadInputError(
                f"{adapter.path} has DoRA on the embedding {name}, which the streaming merge does not handle; "
                "merge it in memory (drop --streaming)."
            )
        if module.bias is not None and name.removesuffix(".weight") + ".bias" not in entries:
            raise BadInputError(
                f"{adapter.path} has a lora_bias on {name.removesuffix('.weight')}, whose base layer has no bias; "
                "serve this adapter unmerged."
            )


def _embedding_names(config: dict[str, Any]) -> tuple[str, str, bool]:
    """Tensor names of the input and output embeddings, and whether the config ties them."""
    from hf_ftkit.planner.structure import build_meta_model, config_from_dict

    pretrained = config_from_dict(config)
    model = build_meta_model(pretrained)
    names = {id(module): name for name, module in model.named_modules()}
    in_name = names[id(model.get_input_embeddings())] + ".weight"
    output = model.get_output_embeddings()
    out_name = names[id(output)] + ".weight" if output is not None else "lm_head.weight"
    tied = bool(getattr(pretrained, "tie_word_embeddings", False))
    return in_name, out_name, tied


def quantized_weights(config: dict[str, Any], names: list[str]) -> set[str]:
    """The weights transformers would load as bitsandbytes 4-bit: every nn.Linear but the kept-out modules."""
    from transformers.quantizers.base import get_keys_to_not_convert

    from hf_ftkit.planner.structure import build_meta_model, config_from_dict

    model = build_meta_model(config_from_dict(config))
    keep = set(get_keys_to_not_convert(model))
    linear = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in keep and name.rsplit(".", 1)[-1] not in keep
    }
    return linear & set(names)


def merged_weight(weight: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """``W + ΔW`` (DoRA: rescaled by magnitude / ‖W + ΔW‖) in float32, as PEFT's merge computes it."""
    delta = module.delta()
    if module.kind == "embedding":  # PEFT's Embedding.merge rounds ΔW to the weight's dtype before adding
        delta = delta.to(weight.dtype).float()
    if module.magnitude is None:
        return delta.add_(weight)  # float32 ΔW + W, the same sum PEFT's in-place merge computes
    from peft.tuners.lora.dora import DoraLinearLayer

    norm = DoraLinearLayer(fan_in_fan_out=module.fan_in_fan_out).get_weight_norm(weight.float(), delta, scaling=1)
    factor = (module.magnitude.float() / norm).view(-1, 1)
    if module.fan_in_fan_out:
        factor = factor.T
    return factor * (weight.float() + delta)


def dequantized(weight: torch.Tensor, qlora: QloraTarget) -> torch.Tensor:
    """``dequant(quant(W))`` with bitsandbytes, as the 4-bit base saw it during training."""
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(
        weight.to(qlora.load_dtype).contiguous(), compress_statistics=qlora.double_quant, quant_type=qlora.quant_type
    )
    return bnb_functional.dequantize_4bit(packed, state)


def stream_merge(
    base_dir: Path,
    adapter: Adapter,
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    qlora: QloraTarget | None = None,
    max_shard_bytes: int = 5 * 10**9,
    progress: Progress | None = None,
    extra_files_from: Path | None = None,
    plan: MergePlan | None = None,
) -> MergePlan:
    """Write ``base + adapter`` into the existing, empty ``out_dir``; returns the plan it followed
    (``plan``, when the caller already made it with ``plan_merge`` for the same inputs)."""
    plan = plan or plan_merge(base_dir, adapter, dtype, qlora)
    shards = split_shards(plan.outputs, max_shard_bytes)
    files = shard_names(len(shards))
    done = 0
    weight_map = {}
    # Three stages overlap: the next input is read and the previous output written while this one is
    # computed (torch and file I/O release the GIL); at most one tensor waits in each stage.
    with ThreadPoolExecutor(1, "hf-ftkit-read") as reader, ThreadPoolExecutor(1, "hf-ftkit-write") as writes:
        order = [(file, tensor) for file, shard in zip(files, shards, strict=True) for tensor in shard]
        space = _Workspace(plan, [t for _, t in order])
        upcoming = reader.submit(_input_of, order[0][1], plan, space.read(0)) if order else None
        pending: Future[None] | None = None
        writers: dict[str, ShardWriter] = {}
        try:
            for i, (file, tensor) in enumerate(order):
                weight = upcoming.result() if upcoming else None
                if i + 1 < len(order):
                    upcoming = reader.submit(_input_of, order[i + 1][1], plan, space.read(i + 1))
                else:
                    upcoming = None
                output = None if weight is None else _output_of(tensor, weight, plan, qlora, space, i)
                if pending is not None:
                    pending.result()
                if file not in writers:
                    _close_previous(writers)
                    writers[file] = ShardWriter(out_dir / file, [t for f, t in order if f == file])
                pending = writes.submit(_write, writers[file], tensor, output, plan)
                weight_map[tensor.name] = file
                done += tensor.nbytes
                if progress:
                    progress(done, plan.total_bytes)
            if pending is not None:
                pending.result()
            _close_previous(writers)
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
    if len(files) > 1:
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    copy_model_files(base_dir, out_dir, plan, dtype, extra_files_from)
    return plan


def _close_previous(writers: dict[str, ShardWriter]) -> None:
    for file in list(writers):
        writers.pop(file).close()


def _needs_compute(tensor: OutTensor, plan: MergePlan) -> bool:
    name = tensor.name
    return (name in plan.modules or name in plan.replacements or name in plan.quantized
            or _bias_module(name, plan) is not None)


def _bias_module(name: str, plan: MergePlan) -> LoraModule | None:
    if not name.endswith(".bias"):
        return None
    module = plan.modules.get(name.removesuffix(".bias") + ".weight")
    return module if module is not None and module.bias is not None else None


class _Workspace:
    """Reused buffers for the common case (plain LoRA on a linear weight, dtype unchanged): two read slots,
    one float32 ΔW and two output slots, each as large as the largest such tensor. Fresh allocations of that
    size would be returned to the OS and re-faulted for every tensor, which costs more than the arithmetic.
    """

    def __init__(self, plan: MergePlan, tensors: list[OutTensor]) -> None:
        fast = [t for t in tensors if _fast_path(t, plan)]
        biggest = max((t.nbytes // torch.empty((), dtype=t.dtype).element_size() for t in fast), default=0)
        widest = max((torch.empty((), dtype=t.dtype).element_size() for t in fast), default=1)
        self.reads = [torch.empty(biggest * widest, dtype=torch.uint8) for _ in range(2)]
        self.outputs = [torch.empty(biggest * widest, dtype=torch.uint8) for _ in range(2)]
        self.delta = torch.empty(biggest, dtype=torch.float32)
        self.fast = {t.name for t in fast}

    def read(self, index: int) -> torch.Tensor:
        return self.reads[index % 2]


def _fast_path(tensor: OutTensor, plan: MergePlan) -> bool:
    module, source = plan.modules.get(tensor.name), plan.sources.get(tensor.name)
    return (module is not None and module.kind == "linear" and module.magnitude is None
            and not module.fan_in_fan_out and source is not None and source.dtype == tensor.dtype
            and tensor.name not in plan.replacements and tensor.name not in plan.quantized)


def _input_of(tensor: OutTensor, plan: MergePlan, buffer: torch.Tensor) -> torch.Tensor | None:
    """The tensor to transform, read from the base (or the adapter's replacement); None: copy bytes as they are."""
    source = plan.sources[tensor.name]
    if not _needs_compute(tensor, plan):
        assert source is not None
        return None if source.dtype == tensor.dtype else read_tensor(source)
    replacement = plan.replacements.get(tensor.name)
    if replacement is not None:
        return replacement
    assert source is not None
    return read_tensor(source, into=buffer if buffer.numel() >= source.nbytes else None)


def _output_of(tensor: OutTensor, weight: torch.Tensor, plan: MergePlan, qlora: QloraTarget | None,
               space: _Workspace, index: int) -> torch.Tensor:
    name = tensor.name
    if name in space.fast:  # W + scaling·(B @ A) with the same float32 operations as PEFT, in reused buffers
        lora = plan.modules[name]
        delta = torch.matmul(lora.lora_B.float(), lora.lora_A.float(),
                             out=space.delta[: weight.numel()].view(weight.shape))
        delta.mul_(lora.scaling).add_(weight)
        out = space.outputs[index % 2][: tensor.nbytes].view(tensor.dtype).view(weight.shape)
        return out.copy_(delta)
    original = weight
    if weight.is_floating_point() and weight.dtype != tensor.dtype:
        # the same inputs PEFT sees: the base loaded in the output dtype, then W + ΔW in float32, rounded once
        weight = weight.to(tensor.dtype)
    if name in plan.quantized and qlora is not None:
        weight = dequantized(weight, qlora)
    module = plan.modules.get(name)
    if module is not None:
        weight = merged_weight(weight, module)
    bias_module = _bias_module(name, plan)
    if bias_module is not None:
        assert bias_module.bias is not None
        weight = weight.float() + bias_module.bias.float() * bias_module.scaling
    weight = weight.to(tensor.dtype)
    if weight.untyped_storage().data_ptr() == original.untyped_storage().data_ptr():
        weight = weight.clone()  # the read buffer is reused for a later tensor while this one is written
    return weight


def _write(writer: ShardWriter, tensor: OutTensor, output: torch.Tensor | None, plan: MergePlan) -> None:
    if output is None:
        source = plan.sources[tensor.name]
        assert source is not None
        writer.copy_from(tensor.name, source)
    else:
        writer.write_tensor(tensor.name, output)


def copy_model_files(
    base_dir: Path, out_dir: Path, plan: MergePlan, dtype: torch.dtype | None, extra_files_from: Path | None
) -> None:
    """config.json (with the merge's edits), generation config, tokenizer and chat template files."""
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and path.name not in SKIP_FILES and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, out_dir / path.name)
    if extra_files_from is not None:  # a tokenizer saved with the adapter (e.g. added tokens) wins
        for name in TOKENIZER_FILES:
            if (extra_files_from / name).is_file():
                shutil.copy2(extra_files_from / name, out_dir / name)
    config = json.loads((base_dir / "config.json").read_text())
    config.update(plan.config_updates)
    if dtype is not None:
        from hf_ftkit._dtypes import from_torch

        long_name = str(dtype).removeprefix("torch.")
        assert from_torch(dtype) is not None
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = long_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
