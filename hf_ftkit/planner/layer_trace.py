"""Per-layer memory traced for architectures the analytic formulas were not validated on.

The analytic activation model is checked against full traces for the architectures listed in
``data/validated_architectures.json`` (``tests/planner/test_architectures.py`` keeps that list honest). For any
other decoder, the model is built from its own config and a training step is traced under FakeTensorMode (no
memory is allocated) with a few of its decoder layers. Every further layer of a kind adds the same parameters,
gradients, optimizer states and saved activations, so for a uniform stack ``trace(1) + (n - 1) × (trace(2) -
trace(1))`` is the full model's single-device allocated peak: dropout, composite activations, parallel
attention/MLP blocks, extra norms are all in it by construction. A stack of several kinds
(:func:`hf_ftkit.planner.structure.layer_kinds`: DeepSeek's dense first layers and MoE rest, Jamba's Mamba and
attention layers, Gemma 3's sliding and global ones) starts from a base of the first layer of each kind and the
last of each run of alike layers, and adds ``(length - 1) × (trace(base + one more of the run) - trace(base))``
for each run. That holds phase by phase (each forward; each backward, whole and from the bottom decoder layer on;
each optimizer step: :func:`hf_ftkit.planner.trace.trace_step`), and the peak is the highest phase so
extrapolated: which phase peaks can change with depth (a few layers peak with the logits' gradients, a deep model
with all its gradients made). Results are cached by config and inputs (in memory and on disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hf_ftkit._data import load
from hf_ftkit.errors import first_line, raised_by, raised_in
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.spec import ModelSpec

CACHE_VERSION = 15  # 3: the 4-bit stand-in returns its input dtype and replaces Conv1D, as bitsandbytes does;
# 4: the fp32 upcast of a 4-bit base reaches its modules_to_save copies; 5: adapters at precision bf16 run without
# autocast, and adapter_dtype; 6: the tracer runs without ModTracker's module hooks, whose reference cycles kept
# module temporaries alive; 7: a padded batch is traced with its padding mask; 8: a 4-bit base at precision bf16
# runs without autocast (with kbit_upcast, in fp32); 9: one more layer of each kind of decoder layer is traced,
# not the first two layers alone; 10: that one more layer runs after the first of each kind; 11: extrapolated
# phase by phase, and a stack of several kinds from a base holding one more layer of each; 12: activation
# offloading traced as TRL runs it, Liger kernels left out of the trace; 13: a bf16 quant_storage traced, its packed
# weights left out of the fp32 upcast; 14: with activation offloading a uniform stack's base holds two layers;
# 15: an unpacked batch holds no packed-sequence mask (as on real tensors), a packed one runs as a padding-free row


def validated(model_type: str) -> bool:
    return model_type in load("validated_architectures")["model_types"]


def _cache_file(key: str) -> Path:
    root = Path(os.environ.get("HF_FTKIT_CACHE") or Path.home() / ".cache" / "hf_ftkit")
    return root / "layer_traces" / f"{key}.json"


def traced_inputs(inputs: PlanInputs) -> PlanInputs:
    """What a trace of ``inputs`` runs: one device, no Liger kernels (Triton kernels, which need a GPU; the plan adds
    the formulas' figure for what Liger saves), and the micro-batches that differ (later ones repeat the second)."""
    return inputs.replace(gpus=1, nodes=1, shard="none", offload="none", use_liger_kernel=False,
                          gradient_accumulation_steps=inputs.distinct_micro_batches)


def untraced_options(inputs: PlanInputs) -> list[str]:
    """What ``traced_inputs`` leaves out of a single-device run's trace, named for the plan's warning."""
    return [name for name, on in (("Liger's Triton kernels (they need a GPU)", inputs.use_liger_kernel),
                                  (f"--offload {inputs.offload} (host memory)", inputs.offload != "none")) if on]


def traced_allocated_peak(spec: ModelSpec, inputs: PlanInputs) -> TracedLayers | TraceFailed:
    """The single-device allocated peak extrapolated from traces of the model's first decoder layer and one more
    of each kind, or why torch/transformers (or PEFT, refusing the adapter) cannot trace this model here."""
    single = traced_inputs(inputs)
    payload = json.dumps({"v": CACHE_VERSION, "config": spec.config, "inputs": single.to_dict()}, sort_keys=True,
                         default=str)
    return _traced(hashlib.sha256(payload.encode()).hexdigest()[:24], payload)


@dataclass(frozen=True)
class TracedLayers:
    """A full model's allocated peak from its traced layers, and how many kinds of decoder layer it has."""

    peak_bytes: int
    kinds: int


@dataclass(frozen=True)
class TraceFailed:
    """Why the layers could not be traced here: the error, where it was raised, and whether it is PEFT refusing
    the adapter configuration (a ValueError raised in PEFT), which the run itself would hit."""

    reason: str
    peft_refused: bool = False


@cache
def _traced(key: str, payload: str) -> TracedLayers | TraceFailed:
    file = _cache_file(key)
    try:
        stored = json.loads(file.read_text())
        return TracedLayers(int(stored["peak_bytes"]), int(stored["kinds"]))
    except (OSError, ValueError, KeyError):
        pass
    data = json.loads(payload)
    config, inputs = data["config"], PlanInputs(**_inputs_fields(data["inputs"]))
    try:
        from hf_ftkit.planner.structure import build_meta_model, config_from_dict, layer_kinds

        kinds = layer_kinds(build_meta_model(config_from_dict(config)))
        base, per_run = _trace_kinds(config, inputs, kinds)
    except Exception as exc:  # an architecture the tracer cannot run: the caller warns and keeps the formulas
        if isinstance(exc, ValueError) and raised_by(exc, "peft"):
            return TraceFailed(first_line(exc, 300).rstrip("."), peft_refused=True)
        return TraceFailed(f"{type(exc).__name__} in {raised_in(exc) or '?'}: {first_line(exc, 120)}")
    peak = _extrapolated(base, per_run)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        from hf_ftkit._files import write_text_atomic

        record = {"peak_bytes": peak, "kinds": len(kinds), "base": base, "per_run": per_run}
        write_text_atomic(file, json.dumps(record) + "\n")
    except OSError:
        pass  # a read-only home: the in-memory cache still serves this process
    return TracedLayers(peak, len(kinds))


def _trace_kinds(config: dict[str, Any], inputs: PlanInputs,
                 kinds: list[list[int]]) -> tuple[list[int], list[dict[str, Any]]]:
    """The traced phase peaks of a base cut of the model, and for each run of alike layers that repeats, those of the
    base with one more of them: what each further layer of that run adds.

    One kind: the first layer is the base. Several kinds: the base is the first layer of each kind (so the
    adapter's targets and the KV cache find what they need) and the last of each run of alike layers, in the
    model's order, so that it ends with the model's own last layer and every kind's backward already runs in it
    once: what happens once per step (Jamba's first Mamba backward after layers that save nothing, the top layer's
    backward) is then in the base and not taken as a per-layer cost. A layer saves activations for the backward
    only from the first layer that trains on (an adapter run may train none of its first layers: Bamba's Mamba
    layers ahead of its first attention layer, when LoRA adapts the attention alone), so a kind's layers ahead of
    that layer are a run of their own, and the rest another. Each run's further layers are traced as its first,
    in its place in the model's order."""
    from hf_ftkit.planner.structure import config_from_dict
    from hf_ftkit.planner.trace import trace_step

    def trace(layers: tuple[int, ...]) -> list[int]:
        return list(trace_step(config_from_dict(config), inputs, layers=layers).phase_peaks)

    firsts = tuple(group[0] for group in kinds)
    if len(kinds) == 1:  # a uniform stack: its first layer (two with offloading), and one more
        # activation offloading keeps at most two layers' saved tensors on the device: a second layer adds them, a
        # third does not
        lead = 2 if inputs.activation_offloading else 1
        stack = kinds[0]
        base_layers, more = tuple(stack[:lead]), stack[lead:]
        per_run = [{"layers": len(more), "layer": more[0], "traced": trace((*base_layers, more[0]))}] if more else []
        return trace(base_layers), per_run
    trained_from = _first_trained_layer(config, inputs, firsts)
    runs = [run for group in kinds for ahead in (True, False)
            if (run := [i for i in group[1:] if (i < trained_from) == ahead])]
    base = tuple(sorted({*firsts, *(run[-1] for run in runs)}))
    per_run = [{"layers": len(run) - 1, "layer": run[0], "traced": trace(tuple(sorted({*base, run[0]})))}
               for run in runs if len(run) > 1]
    return trace(base), per_run


def _extrapolated(base: list[int], per_run: list[dict[str, Any]]) -> int:
    """The highest phase of the full model: each phase's peak of the base, plus each run's further layers times
    what one more of them adds to that phase."""
    return max(peak + sum(run["layers"] * max(0, run["traced"][phase] - peak) for run in per_run)
               for phase, peak in enumerate(base))


def _first_trained_layer(config: dict[str, Any], inputs: PlanInputs, firsts: tuple[int, ...]) -> int:
    """The index of the first decoder layer from which the backward reaches every layer: 0 when the embeddings'
    output needs a gradient (full fine-tuning, trained embeddings, gradient checkpointing's input hook), else the
    first layer with a trainable parameter (kinds are alike, so the first of each kind tells)."""
    if not inputs.is_peft or inputs.gradient_checkpointing:
        return 0
    from hf_ftkit.planner.structure import config_from_dict, decoder_stack
    from hf_ftkit.planner.trace import build_traced_model

    model = build_traced_model(config_from_dict(config), inputs, firsts)
    if any(p.requires_grad for p in model.get_input_embeddings().parameters()):
        return 0
    layers = decoder_stack(model, len(firsts))
    trained = [i for i, layer in zip(firsts, layers, strict=True) if any(p.requires_grad for p in layer.parameters())]
    return min(trained, default=sys.maxsize)  # no layer trains (LoRA on the output layer alone): none saves


def _inputs_fields(values: dict[str, Any]) -> dict[str, Any]:
    fields = dict(values)
    if isinstance(fields.get("modules_to_save"), list):
        fields["modules_to_save"] = tuple(fields["modules_to_save"])
    return {k: v for k, v in fields.items() if k in PlanInputs.field_names()}
