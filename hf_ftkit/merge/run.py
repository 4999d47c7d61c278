"""``merge_adapters``: compose, merge (in memory or streaming), verify, and write all-or-nothing."""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_ftkit._dtypes import to_torch
from hf_ftkit.errors import BadInputError, MergeVerificationError
from hf_ftkit.merge._stream_io import base_entries
from hf_ftkit.merge.adapters import Adapter, read_adapter
from hf_ftkit.merge.base import read_config, resolve_base_dir
from hf_ftkit.merge.compose import Composition, compose
from hf_ftkit.merge.config import DTYPES, MergeConfig
from hf_ftkit.merge.inspect import compatibility, uncovered_finding
from hf_ftkit.merge.output import atomic_directory, check_space, check_target, scratch_directory
from hf_ftkit.merge.streaming import (
    TOKENIZER_FILES,
    MergePlan,
    QloraTarget,
    base_shapes,
    plan_merge,
    stream_merge,
)
from hf_ftkit.merge.verify import (
    DEFAULT_TOLERANCE,
    available_ram,
    compare,
    logits_of,
    model_bytes,
    prompt_ids,
    verify_layers,
)

# Relative tolerance of the layer-by-layer check (float32 exact up to reassociation; 16-bit up to rounding).
LAYER_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
__all__ = ["DTYPES", "MergeConfig", "MergeResult", "merge_adapters", "stored_dtype"]


@dataclass
class MergeResult:
    """What ``merge_adapters`` wrote and what it measured."""

    out: Path
    mode: str  # "adapter", "in-memory" or "streaming"
    composition: dict[str, Any]
    verification: dict[str, Any] | None = None
    qlora: dict[str, Any] | None = None
    config_updates: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "mode": self.mode,
            "composition": self.composition,
            "verification": self.verification,
            "qlora": self.qlora,
            "config_updates": self.config_updates,
            "seconds": round(self.seconds, 3),
        }


def merge_adapters(
    base: str | Path,
    adapters: list[str | Path],
    out: str | Path,
    config: MergeConfig | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> MergeResult:
    """Compose ``adapters`` and write the result: an adapter (``config.adapter_only``) or the merged model.

    ``config`` holds every option (:class:`MergeConfig`); they may also be passed as keyword arguments
    (``dtype="bf16", streaming=True``), not both. The output appears at ``out`` only complete and
    verified; on any failure nothing is left there.

    Example:
        >>> merge_adapters("base_dir", ["adapter_dir"], "merged", MergeConfig(dtype="bf16", streaming=True))
    """
    started = time.perf_counter()
    if config is not None and options:
        raise BadInputError(f"pass the merge options in the MergeConfig or as keywords, not both (got "
                            f"{', '.join(sorted(options))} beside a config).")
    try:
        cfg = config if config is not None else MergeConfig(**options)
    except TypeError as exc:  # an option name MergeConfig does not have
        raise BadInputError(f"{exc}; the options are MergeConfig's fields.") from None
    out = Path(out)
    torch_dtype = to_torch(cfg.dtype) if cfg.dtype else None
    base_dir = None if cfg.adapter_only else resolve_base_dir(base)
    inputs = [*adapters, base_dir or base]
    check_target(out.absolute(), cfg.overwrite, inputs)
    read = [read_adapter(p, allow_pickle=cfg.allow_pickle) for p in adapters]
    for adapter in read:  # the in-memory (PEFT) and streaming paths would disagree on such an adapter
        if (finding := uncovered_finding(adapter)) is not None:
            raise BadInputError(finding.message)
    composition = compose(base_dir or base, list(read), cfg.weights, cfg.method, density=cfg.density,
                          svd_rank=cfg.svd_rank)
    if cfg.adapter_only:
        with atomic_directory(out, overwrite=cfg.overwrite, inputs=inputs,
                              marker=_marker("adapter", composition)) as part:
            composition.save(part)
            _copy_tokenizer(read[0].path, part)
        return MergeResult(out, "adapter", composition.report(), seconds=time.perf_counter() - started)
    assert base_dir is not None
    read_config(base_dir)
    scratch = scratch_directory(out)  # beside the output: same disk, and cleaned up if this run is killed
    try:
        base_dir = _safetensors_base(base_dir, cfg.allow_pickle, scratch / "base")
        run = _Run(cfg, torch_dtype, progress, started, inputs)
        return _merge_into_base(base_dir, read, composition, out, scratch / "adapter", run)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stored_dtype(base: str | Path) -> torch.dtype:
    """The floating dtype the base checkpoint is stored in (what ``dtype="auto"`` loads)."""
    entries = base_entries(resolve_base_dir(base))
    return next((e.dtype for e in entries.values() if e.dtype.is_floating_point), torch.float32)


def _marker(mode: str, composition: Composition) -> str:
    """The output's MARKER: what wrote it (a later --overwrite may replace only such a directory)."""
    from hf_ftkit import __version__

    return json.dumps({"written_by": f"hf-ftkit {__version__}", "command": "merge", "mode": mode,
                       "composition": {k: v for k, v in composition.report().items() if k != "layer_errors"}},
                      indent=2) + "\n"


def _safetensors_base(base_dir: Path, allow_pickle: bool, scratch: Path) -> Path:
    """The base itself when it is safetensors; a pickle base is converted once (only with allow_pickle)."""
    if list(base_dir.glob("*.safetensors")):
        return base_dir
    if not list(base_dir.glob("*.bin")):
        raise BadInputError(f"{base_dir} has no model weights (*.safetensors); pass a complete checkpoint directory.")
    if not allow_pickle:
        raise BadInputError(
            f"the base in {base_dir} holds pickle weights (*.bin), which can run code when loaded; convert it to "
            "safetensors or pass --allow-pickle if you trust it."
        )
    from transformers import AutoModelForCausalLM

    try:  # transformers reads .bin with weights_only: a crafted pickle fails here instead of running
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto", use_safetensors=False,
                                                     trust_remote_code=False)
    except Exception as exc:  # unpickling raises many types; all mean "not plain weights"
        raise BadInputError(f"the pickle weights in {base_dir} are not plain tensors ({type(exc).__name__}); "
                            "convert the base to safetensors from a source you trust.") from None
    model.save_pretrained(scratch)
    _copy_tokenizer(base_dir, scratch)
    for extra in ("generation_config.json",):
        if (base_dir / extra).is_file():
            shutil.copy2(base_dir / extra, scratch / extra)
    return scratch


@dataclass
class _Run:
    """A merge's options and what the run itself adds (resolved dtype, progress hook, start time, inputs)."""

    config: MergeConfig
    dtype: torch.dtype | None
    progress: Callable[[int, int], None] | None
    started: float
    inputs: list[str | Path]


def _merge_into_base(base_dir: Path, read: list[Adapter], composition: Composition, out: Path, adapter_dir: Path,
                     run: _Run) -> MergeResult:
    cfg = run.config
    torch_dtype, streaming, qlora = run.dtype, cfg.streaming, cfg.qlora
    errors = [f for f in compatibility(read, base_shapes(base_dir)) if f.level == "error"]
    if errors:
        raise BadInputError(errors[0].message)
    adapter = composition.as_adapter(read[0].path)
    plan = plan_merge(base_dir, adapter, torch_dtype, qlora)
    check_space(out, plan.total_bytes)
    result = MergeResult(out, "streaming" if streaming else "in-memory", composition.report(),
                         config_updates=plan.config_updates)
    adapter_dir.mkdir()
    composition.save(adapter_dir)
    mode = "streaming" if streaming else "in-memory"
    with atomic_directory(out, overwrite=cfg.overwrite, inputs=run.inputs,
                          marker=_marker(mode, composition)) as partial:
        if streaming:
            stream_merge(base_dir, adapter, partial, dtype=torch_dtype, qlora=qlora,
                         max_shard_bytes=cfg.max_shard_bytes, progress=run.progress,
                         extra_files_from=read[0].path, plan=plan)
        else:
            _merge_in_memory(base_dir, adapter_dir, partial, plan, torch_dtype, qlora, cfg.max_shard_bytes)
            _copy_tokenizer(base_dir, partial)
            _copy_tokenizer(read[0].path, partial)
        if cfg.verify:
            result.verification, result.qlora = _verify(
                base_dir, adapter_dir, partial, plan, composition, torch_dtype, qlora, cfg.prompts,
                cfg.tolerance, streaming)
            diff = result.verification["max_abs_logit_diff"]
            if not math.isfinite(diff):
                raise MergeVerificationError(
                    "the merged model's outputs are not finite (NaN or inf), so nothing was written; the base "
                    "holds non-finite weights or the merge overflowed --dtype: check the base, or merge in fp32.")
            if not result.verification["passed"] and qlora is not None:
                raise MergeVerificationError(
                    f"the merged model differs from the 4-bit training model by {diff:.3g} (tolerance "
                    f"{result.verification['tolerance']:.3g}), so nothing was written; pass the dtype the QLoRA "
                    f"base was loaded in before quantization (--qlora-dtype, {_dtype_name(qlora.load_dtype)} was "
                    "used), or raise --tolerance if this is expected rounding.")
            if not result.verification["passed"]:
                raise MergeVerificationError(
                    f"the merged model differs from base + adapter by "
                    f"{result.verification['max_abs_logit_diff']:.3g} (tolerance "
                    f"{result.verification['tolerance']:.3g}), so nothing was written; raise --tolerance if this "
                    "is expected rounding, or check that the base is the one the adapter was trained on."
                )
    result.seconds = time.perf_counter() - run.started
    return result


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _copy_tokenizer(source: Path, destination: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)


def _load_base(base_dir: Path, plan: MergePlan, dtype: torch.dtype | None, quantization: Any = None) -> Any:
    """The base as the adapter expects it: resized vocabulary, untied embeddings when the merge unties them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=dtype or "auto", quantization_config=quantization, low_cpu_mem_usage=True,
        trust_remote_code=False,
    )
    vocab = plan.config_updates.get("vocab_size")
    if vocab:
        model.resize_token_embeddings(vocab)
    if plan.config_updates.get("tie_word_embeddings") is False:
        output = model.get_output_embeddings()
        output.weight = torch.nn.Parameter(output.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    return model


def _merge_in_memory(base_dir: Path, adapter_dir: Path, out_dir: Path, plan: MergePlan, dtype: torch.dtype | None,
                     qlora: QloraTarget | None, max_shard_bytes: int) -> None:
    from peft import PeftModel

    from hf_ftkit.merge.streaming import dequantized

    model = _load_base(base_dir, plan, dtype)
    if qlora is not None:
        params = dict(model.named_parameters())
        for name in plan.quantized:
            params[name].data = dequantized(params[name].data, qlora).to(params[name].dtype)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, max_shard_size=max_shard_bytes)
    del merged, model
    gc.collect()


def _verify(base_dir: Path, adapter_dir: Path, out_dir: Path, plan: MergePlan, composition: Composition,
            dtype: torch.dtype | None, qlora: QloraTarget | None, prompts: list[str] | None,
            tolerance: float | None, streaming: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    entries = base_entries(base_dir)
    out_dtype = dtype or next(e.dtype for e in entries.values() if e.dtype.is_floating_point)
    needed = model_bytes(entries) * 3
    if streaming and needed > available_ram():
        written = base_entries(out_dir)
        modules = composition.as_adapter().modules()
        check = verify_layers({f"{n}.weight": m for n, m in modules.items()}, written, entries,
                              tolerance or LAYER_TOLERANCE.get(out_dtype, 2e-2))
        return check.to_dict(), None
    vocab = plan.config_updates.get("vocab_size") or int(read_config(base_dir).get("vocab_size", 32000))
    tokenizer_dir = out_dir if (out_dir / "tokenizer_config.json").is_file() else base_dir
    inputs = prompt_ids(tokenizer_dir, prompts, vocab)
    limit = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(out_dtype, 1.0)
    # Everything runs in float32 so the comparison isolates the merge: the reference is the base as the merge
    # read it (in the output dtype, or the QLoRA load dtype) plus the unmerged adapter; 16-bit compute noise,
    # which moves a bf16 model's logits by ~1-2 on its own, stays out of the number.
    merged = _logits(lambda: _load_merged(out_dir, torch.float32), inputs)
    if qlora is None:
        truth = _logits(lambda: _reference(base_dir, adapter_dir, plan, dtype, None), inputs)
        return compare(truth, merged, limit).to_dict(), None
    trained = _logits(lambda: _reference(base_dir, adapter_dir, plan, qlora.load_dtype, qlora), inputs)
    original = _logits(lambda: _reference(base_dir, adapter_dir, plan, qlora.load_dtype, None), inputs)
    check = compare(trained if qlora.target == "dequantized" else original, merged, limit)
    report = {
        "training_reference": f"{qlora.quant_type} base as the 4-bit layers compute it (dequant(quant(W))) + adapter",
        "target": qlora.target,
        "matches_training": "dequantized",
        "merged_vs_training": compare(trained, merged, limit).max_abs_logit_diff,
        # the target not written is measured on its unmerged equivalent (the original base + adapter)
        "original_target_vs_training": compare(trained, original, limit).max_abs_logit_diff,
    }
    return check.to_dict(), report


def _reference(base_dir: Path, adapter_dir: Path, plan: MergePlan, dtype: torch.dtype | None,
               qlora: QloraTarget | None) -> Any:
    """Base (read in ``dtype``; with ``qlora``, its quantized linears as dequant(quant(W))) + adapter, in float32."""
    from hf_ftkit.merge.streaming import dequantized, quantized_weights

    model = _load_base(base_dir, plan, dtype)
    if qlora is not None:
        params = dict(model.named_parameters())
        for name in quantized_weights(read_config(base_dir), list(params)):
            params[name].data = dequantized(params[name].data, qlora)
    return _with_adapter(model.float(), adapter_dir)


def _logits(load: Callable[[], Any], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    model = load()
    logits = logits_of(model, inputs)
    del model
    gc.collect()
    return logits


def _load_merged(out_dir: Path, dtype: torch.dtype | None) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype or "auto", trust_remote_code=False)


def _with_adapter(model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir)
