"""Forgetting checks: held-out bits per byte, perplexities and KL to the base, during and after training."""

from hf_ftkit.forgetting.callback import ForgettingCallback
from hf_ftkit.forgetting.compare import measure_forgetting
from hf_ftkit.forgetting.evaluator import ForgettingEvaluator, Measurement
from hf_ftkit.forgetting.heldout import load_texts, sample_documents, stdlib_documents

__all__ = ["ForgettingCallback", "ForgettingEvaluator", "Measurement", "load_texts", "measure_forgetting",
           "sample_documents", "stdlib_documents"]
