"""Per-layer memory traced for architectures the analytic formulas were not validated on.

The analytic activation model is checked against full traces for the architectures listed in
``data/validated_architectures.json`` (``tests/planner/test_architectures.py`` keeps that list honest). For any
other decoder, the model's own config is built with one and with two decoder layers and a training step of
each is traced under FakeTensorMode (no memory is allocated). Every decoder layer adds the same parameters,
gradients, optimizer states and saved activations, so ``trace(1) + (n - 1) × (trace(2) - trace(1))`` is the
full model's single-device allocated peak: dropout, composite activations, parallel attention/MLP blocks,
extra norms are all in it by construction. Results are cached by config and inputs (in memory and on disk).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from hf_ftkit._data import load
from hf_ftkit.planner.inputs import PlanInputs
from hf_ftkit.planner.spec import ModelSpec

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
CACHE_VERSION = 8  # 3: the 4-bit stand-in returns its input dtype and replaces Conv1D, as bitsandbytes does;
# 4: the fp32 upcast of a 4-bit base reaches its modules_to_save copies; 5: adapters at precision bf16 run without
# autocast, and adapter_dtype; 6: the tracer runs without ModTracker's module hooks, whose reference cycles kept
# module temporaries alive; 7: a padded batch is traced with its padding mask; 8: a 4-bit base at precision bf16
# runs without autocast (with kbit_upcast, in fp32)


def validated(model_type: str) -> bool:
    return model_type in load("validated_architectures")["model_types"]


def _cache_file(key: str) -> Path:
    root = Path(os.environ.get("HF_FTKIT_CACHE") or Path.home() / ".cache" / "hf_ftkit")
    return root / "layer_traces" / f"{key}.json"


def _with_layers(config: dict[str, Any], layers: int, original: int) -> dict[str, Any]:
    out = dict(config)
    for key in _LAYER_KEYS:
        if key in out:
            out[key] = layers
    for key, value in config.items():  # per-layer lists (layer_types, sliding-window patterns ...)
        if isinstance(value, list) and len(value) == original and key not in ("architectures",):
            out[key] = value[:layers]
    return out


def _single_device(inputs: PlanInputs) -> PlanInputs:
    return inputs.replace(gpus=1, nodes=1, shard="none", offload="none")


def traced_allocated_peak(spec: ModelSpec, inputs: PlanInputs) -> int | None:
    """The single-device allocated peak extrapolated from traces of 1 and 2 decoder layers, or None when
    torch/transformers cannot trace this model here."""
    single = _single_device(inputs)
    payload = json.dumps({"v": CACHE_VERSION, "config": spec.config, "inputs": single.to_dict()}, sort_keys=True,
                         default=str)
    return _traced(hashlib.sha256(payload.encode()).hexdigest()[:24], payload)


@cache
def _traced(key: str, payload: str) -> int | None:
    file = _cache_file(key)
    try:
        return int(json.loads(file.read_text())["peak_bytes"])
    except (OSError, ValueError, KeyError):
        pass
    data = json.loads(payload)
    config, inputs = data["config"], PlanInputs(**_inputs_fields(data["inputs"]))
    layers = next((int(config[k]) for k in _LAYER_KEYS if isinstance(config.get(k), int)), None)
    if layers is None:
        return None
    try:
        from hf_ftkit.planner.structure import config_from_dict
        from hf_ftkit.planner.trace import trace_step

        one = trace_step(config_from_dict(_with_layers(config, 1, layers)), inputs).peak_bytes
        two = trace_step(config_from_dict(_with_layers(config, 2, layers)), inputs).peak_bytes
    except Exception:  # an architecture the tracer cannot run: the caller warns and keeps the formulas
        return None
    peak = one + (layers - 1) * max(0, two - one)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        from hf_ftkit._files import write_text_atomic

        write_text_atomic(file, json.dumps({"peak_bytes": peak, "one_layer": one, "two_layers": two}) + "\n")
    except OSError:
        pass  # a read-only home: the in-memory cache still serves this process
    return peak


def _inputs_fields(values: dict[str, Any]) -> dict[str, Any]:
    fields = dict(values)
    if isinstance(fields.get("modules_to_save"), list):
        fields["modules_to_save"] = tuple(fields["modules_to_save"])
    return {k: v for k, v in fields.items() if k in PlanInputs.field_names()}
