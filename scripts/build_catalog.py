"""Regenerate the derived ``spec`` of every entry in ``hf_ftkit/data/catalog.json``.

Each model is built on the meta device from its ``config`` (no weights, no download) and its exact
parameter structure is written back, so planning a catalog model needs no torch import.

    python scripts/build_catalog.py
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_ftkit.planner.structure import spec_from_config

CATALOG = Path(__file__).resolve().parents[1] / "hf_ftkit" / "data" / "catalog.json"


def main() -> None:
    data = json.loads(CATALOG.read_text())
    for entry in data["models"]:
        spec = spec_from_config(dict(entry["config"]), entry["id"])
        entry["spec"] = spec.to_dict()
        print(f"{entry['id']:45s} {spec.params_total:>18,d}")
    CATALOG.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
