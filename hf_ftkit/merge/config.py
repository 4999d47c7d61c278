"""``MergeConfig``: every option of a merge in one dataclass, validated where it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hf_ftkit.errors import BadInputError
from hf_ftkit.merge.streaming import QloraTarget

DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class MergeConfig:
    """How ``merge_adapters`` composes adapters and writes the result (the ``hf-ftkit merge`` flags).

    Example:
        >>> merge_adapters("base", ["a", "b"], "out", MergeConfig(weights=[0.7, 0.3], dtype="bf16", streaming=True))
    """

    weights: list[float] | None = field(default=None, metadata={"help": "One weight per adapter (default 1 each)."})
    method: str = field(default="exact", metadata={"help": "Composition: exact, or a PEFT combination type."})
    density: float | None = field(default=None, metadata={"help": "Fraction kept by ties/dare/magnitude_prune."})
    svd_rank: int | None = field(default=None, metadata={"help": "Rank of the *_svd combinations."})
    adapter_only: bool = field(default=False, metadata={"help": "Write the composed adapter, not a merged model."})
    dtype: str | None = field(default=None, metadata={"help": "Output dtype: bf16, fp16 or fp32 (default: the "
                                                               "base's)."})
    streaming: bool = field(default=False, metadata={"help": "Merge shard by shard, for bases larger than RAM."})
    qlora: QloraTarget | None = field(default=None, metadata={"help": "A QLoRA adapter's merge target."})
    verify: bool = field(default=True, metadata={"help": "Compare the merged model's logits with base + adapter."})
    prompts: list[str] | None = field(default=None, metadata={"help": "Prompts the verification runs."})
    tolerance: float | None = field(default=None, metadata={"help": "Largest accepted max |Δlogit|."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an output hf-ftkit wrote earlier."})
    allow_pickle: bool = field(default=False, metadata={"help": "Accept a base stored as pickle (*.bin)."})
    max_shard_bytes: int = field(default=5 * 10**9, metadata={"help": "Largest output shard, in bytes."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``BadInputError`` naming the first invalid option and its fix."""
        if self.dtype is not None and self.dtype not in DTYPES:
            raise BadInputError(f"unknown --dtype {self.dtype!r}; use one of: {', '.join(DTYPES)}.")
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            raise BadInputError(
                f"--weights {' '.join(map(str, self.weights))} holds a non-finite value; pass finite numbers.")
        if self.density is not None and not 0 < self.density <= 1:
            raise BadInputError(f"--density {self.density} is outside (0, 1]; pass the fraction of entries to keep.")
        if self.svd_rank is not None and self.svd_rank < 1:
            raise BadInputError(f"--svd-rank {self.svd_rank} is not a positive rank; pass 1 or more.")
        if self.tolerance is not None and not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise BadInputError(f"--tolerance {self.tolerance} is not a finite number >= 0; pass the largest "
                                "accepted max |Δlogit|.")
        if self.max_shard_bytes < 1:
            raise BadInputError("--max-shard-size must be positive; pass e.g. 5GB.")
