"""``hf-ftkit adapters inspect``: what each adapter is, whether a set composes, and whether an engine serves it."""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from hf_ftkit import _data
from hf_ftkit.errors import BadInputError
from hf_ftkit.merge.adapters import Adapter, read_adapter

Level = Literal["error", "warning", "info"]
# Methods that mix A and B matrices index by index, so every adapter must have the same rank.
SAME_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class Finding:
    """One observation about an adapter set; ``error`` blocks composing/merging/serving."""

    level: Level
    message: str


@dataclass
class AdapterSummary:
    """The facts ``inspect`` reports for one adapter."""

    path: str
    base_model: str | None
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    scaling: float
    use_dora: bool
    lora_bias: bool
    target_modules: list[str] | str
    targeted_modules: int
    modules_to_save: list[str]
    trainable_params: int
    size_on_disk: int
    ranks: list[int]
    resized_vocab: int | None


@dataclass
class InspectReport:
    """Per-adapter summaries plus findings about the set (and a serving engine when asked)."""

    adapters: list[AdapterSummary]
    findings: list[Finding] = field(default_factory=list)
    serving: dict[str, Any] | None = None

    @property
    def compatible(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapters": [asdict(a) for a in self.adapters],
            "compatible": self.compatible,
            "findings": [asdict(f) for f in self.findings],
            "serving": self.serving,
        }


def summarize(adapter: Adapter) -> AdapterSummary:
    modules = adapter.modules()
    return AdapterSummary(
        path=str(adapter.path),
        base_model=adapter.base_model,
        peft_type=adapter.peft_type,
        r=adapter.r,
        lora_alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        scaling=adapter.scaling,
        use_dora=adapter.use_dora,
        lora_bias=adapter.lora_bias,
        target_modules=adapter.target_modules,
        targeted_modules=len(modules),
        modules_to_save=adapter.modules_to_save,
        trainable_params=adapter.trainable_params,
        size_on_disk=adapter.size_on_disk,
        ranks=sorted({m.rank for m in modules.values()}),
        resized_vocab=_vocab_of(adapter),
    )


def _vocab_of(adapter: Adapter) -> int | None:
    """Rows of a whole embedding/lm_head the adapter carries (it was saved with a resized vocabulary)."""
    rows = {
        shape[0]
        for key, shape in adapter.shapes.items()
        if len(shape) == 2 and key.endswith(("embed_tokens.base_layer.weight", "lm_head.base_layer.weight"))
    }
    return rows.pop() if len(rows) == 1 else None


def compatibility(adapters: list[Adapter], base_shapes: dict[str, tuple[int, ...]] | None = None) -> list[Finding]:
    """Findings about composing ``adapters`` (and merging them into a base with ``base_shapes``, when given).

    ``base_shapes`` maps base tensor names (``model.layers.0.self_attn.q_proj.weight``) to shapes.
    """
    findings: list[Finding] = [f for a in adapters if (f := uncovered_finding(a)) is not None]
    if base_shapes is not None:
        for adapter in adapters:
            findings += _against_base(adapter, base_shapes)
    if len(adapters) < 2:
        return findings + _single(adapters[0]) if adapters else findings
    names = {a.base_model for a in adapters}
    if len(names) > 1:
        findings.append(Finding("warning", f"the adapters name different bases ({', '.join(map(str, names))})."))
    findings += shapes_agree(adapters)
    ranks = {a.path.name: sorted({m.rank for m in a.modules().values()}) for a in adapters}
    if len({tuple(r) for r in ranks.values()}) > 1:
        findings.append(
            Finding(
                "info",
                f"ranks differ ({ranks}): methods {', '.join(SAME_RANK_METHODS)} need equal ranks; "
                "use exact, cat or an _svd method.",
            )
        )
    targets = [set(a.modules()) for a in adapters]
    if not set.intersection(*targets):
        findings.append(Finding("info", "the adapters target disjoint modules; composing them simply stacks them."))
    elif len({frozenset(t) for t in targets}) > 1:
        findings.append(Finding("info", "the adapters target different module sets; a missing module counts as ΔW=0."))
    saved: dict[str, str] = {}
    for adapter in adapters:
        for module in adapter.full_tensors():
            if module in saved:
                findings.append(
                    Finding(
                        "error",
                        f"{saved[module]} and {adapter.path} both replace {module} (modules_to_save or a saved "
                        "embedding); such full copies cannot be combined: retrain one without it.",
                    )
                )
            saved[module] = str(adapter.path)
    if any(a.use_dora for a in adapters):
        findings.append(
            Finding(
                "error",
                "DoRA adapters rescale the whole weight by a learned magnitude, so their updates do not add; "
                "merge each DoRA adapter on its own instead of composing it.",
            )
        )
    return findings


def uncovered_finding(adapter: Adapter) -> Finding | None:
    """An error when the weights file holds LoRA pairs its config's target_modules does not cover."""
    uncovered = adapter.uncovered_modules()
    if not uncovered:
        return None
    shown = ", ".join(uncovered[:3]) + (f" and {len(uncovered) - 3} more" if len(uncovered) > 3 else "")
    return Finding("error", f"{adapter.path} holds LoRA weights for {shown}, which its target_modules "
                            f"({adapter.config.get('target_modules')}) does not cover, so PEFT would ignore them; "
                            "add them to target_modules in adapter_config.json or re-save the adapter.")


def _single(adapter: Adapter) -> list[Finding]:
    if adapter.use_dora:
        return [Finding("info", f"{adapter.path} is DoRA: it merges on its own but does not compose with others.")]
    return []


def shapes_agree(adapters: list[Adapter]) -> list[Finding]:
    """Errors for modules that two adapters give different shapes (they were trained on different bases)."""
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    findings = []
    for adapter in adapters:
        for name, module in adapter.modules().items():
            shape = tuple(module.delta_shape())
            if name in seen and seen[name][0] != shape:
                findings.append(
                    Finding(
                        "error",
                        f"{name} is {seen[name][0]} in {seen[name][1]} but {shape} in {adapter.path}: "
                        "the adapters were trained on different base models.",
                    )
                )
            seen.setdefault(name, (shape, str(adapter.path)))
    return findings


def _against_base(adapter: Adapter, base_shapes: dict[str, tuple[int, ...]]) -> list[Finding]:
    findings = []
    for name, module in adapter.modules().items():
        shape = base_shapes.get(f"{name}.weight")
        if shape is None:
            findings.append(
                Finding("error", f"{adapter.path} targets {name}, which the base lacks: it is for another base.")
            )
        elif tuple(shape) != tuple(module.delta_shape()) and not _resized_rows(adapter, name, module):
            findings.append(
                Finding(
                    "error",
                    f"{adapter.path} expects {name} of shape {tuple(module.delta_shape())} but the base's is "
                    f"{tuple(shape)}: the adapter was trained on another base.",
                )
            )
        if module.bias is not None and f"{name}.bias" not in base_shapes:
            findings.append(
                Finding(
                    "error",
                    f"{adapter.path} trains a lora_bias on {name}, but the base layer has no bias to merge it into; "
                    "serve it unmerged.",
                )
            )
    for name, tensor_shape in ((n, tuple(t.shape)) for n, t in adapter.full_tensors().items()):
        base = base_shapes.get(name)
        if base is None:
            findings.append(Finding("error", f"{adapter.path} carries {name}, which the base does not have."))
        elif base != tensor_shape:
            if len(base) == 2 and base[1:] == tensor_shape[1:]:
                findings.append(
                    Finding("info", f"{name} is resized from {base[0]} to {tensor_shape[0]} rows (vocabulary).")
                )
            else:
                findings.append(Finding("error", f"{adapter.path} carries {name} {tensor_shape}, base has {base}."))
    return findings


def _resized_rows(adapter: Adapter, name: str, module: Any) -> bool:
    """An embedding LoRA on a resized vocabulary: the adapter's rows follow its own saved embedding."""
    return module.kind == "embedding" and f"{name}.weight" in adapter.full_tensors()


def serving_check(adapters: list[Adapter], engine: str, base: str | None = None) -> tuple[list[Finding], dict]:
    """What ``engine`` (``vllm`` or ``tgi``) needs, and the launch flags that serve these adapters."""
    engines = _data.load("serving")
    if engine not in engines or engine.startswith("_"):
        known = ", ".join(k for k in engines if not k.startswith("_"))
        raise BadInputError(f"unknown serving engine {engine!r}; use one of: {known}.")
    spec = engines[engine]
    findings = []
    max_rank = max((m.rank for a in adapters for m in a.modules().values()), default=0)
    chosen_rank = None
    if spec["max_lora_ranks"]:
        fitting = [r for r in spec["max_lora_ranks"] if r >= max_rank]
        if not fitting:
            findings.append(
                Finding(
                    "error",
                    f"rank {max_rank} is above {spec['name']}'s largest max_lora_rank "
                    f"({spec['max_lora_ranks'][-1]}); compose with an _svd method to a smaller rank.",
                )
            )
        else:
            chosen_rank = fitting[0]
    for adapter in adapters:
        if adapter.use_dora and not spec["allows_dora"]:
            findings.append(Finding("error", f"{adapter.path} is DoRA, which {spec['name']} does not serve; merge it."))
        if adapter.full_tensors() and not spec["allows_modules_to_save"]:
            findings.append(
                Finding(
                    "error",
                    f"{adapter.path} carries full modules ({', '.join(sorted(adapter.full_tensors()))}) that "
                    f"{spec['name']} does not load; merge it into the base instead.",
                )
            )
        if any(m.kind == "embedding" for m in adapter.modules().values()) and not spec["allows_embedding_lora"]:
            findings.append(Finding("error", f"{adapter.path} has LoRA on embeddings, which {spec['name']} ignores."))
    base_name = base or adapters[0].base_model or "BASE"
    if not is_model_reference(base_name):
        findings.append(Finding("error", f"the base name {base_name!r} is neither a hub id nor a path, so no serving "
                                         "command is printed; fix base_model_name_or_path or pass --base."))
        base_name = "BASE"
    pairs = [f"{Path(a.path).name}={a.path}" for a in adapters]
    modules = " ".join(shlex.quote(p) for p in pairs)
    if engine == "tgi":
        modules = shlex.quote(",".join(pairs))
    command = spec["command"].format(base=shlex.quote(base_name), max_rank=chosen_rank, count=len(adapters),
                                     modules=modules)
    return findings, {"engine": engine, "max_lora_rank": chosen_rank, "command": command}


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_PATH = re.compile(r"^[\w./~+@-]+$")  # what a local path made by a tool or a person holds; no shell syntax


def is_model_reference(name: str) -> bool:
    """A hub id (``org/name``), or a path: an existing one, or one without shell syntax or control characters."""
    if _HUB_ID.match(name) and ".." not in name:
        return True
    if any(ord(c) < 32 for c in name):
        return False
    return Path(name).expanduser().exists() or bool(_PATH.match(name))


def inspect_adapters(
    paths: list[str | Path],
    *,
    base: str | Path | None = None,
    serving: str | None = None,
    allow_pickle: bool = False,
) -> InspectReport:
    """Summaries, a compatibility verdict for the set, and an optional serving-engine check.

    Example:
        >>> report = inspect_adapters(["out/tenant_a", "out/tenant_b"], serving="vllm")
        >>> report.compatible, report.serving["command"]
    """
    if not paths:
        raise BadInputError("no adapter given; pass one or more adapter directories.")
    adapters = [read_adapter(p, allow_pickle=allow_pickle) for p in paths]
    base_shapes = None
    if base is not None:
        from hf_ftkit.merge.base import resolve_base_dir
        from hf_ftkit.merge.streaming import base_shapes as shapes_of

        base_shapes = shapes_of(resolve_base_dir(base))
    report = InspectReport([summarize(a) for a in adapters], compatibility(adapters, base_shapes))
    if serving:
        findings, report.serving = serving_check(adapters, serving, str(base) if base else None)
        report.findings += findings
    return report
