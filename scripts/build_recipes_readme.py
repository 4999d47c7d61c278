"""Regenerate recipes/README.md and each recipe's ``# Plan:`` header line from the recipes and the planner.

    python scripts/build_recipes_readme.py [--check]   # --check: exit 1 if anything is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_ftkit.recipes.catalog import catalog, plan_line, render_readme, with_plan_line

ROOT = Path(__file__).resolve().parents[1] / "recipes"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    rows = catalog(ROOT)
    for row, planned in rows:
        path = ROOT / row.path
        text = path.read_text()
        updated = with_plan_line(text, plan_line(planned))
        if updated != text:
            stale.append(str(path))
            if not args.check:
                path.write_text(updated)
    readme = render_readme([row for row, _ in rows])
    if (ROOT / "README.md").read_text() != readme:
        stale.append(str(ROOT / "README.md"))
        if not args.check:
            (ROOT / "README.md").write_text(readme)
    for name in stale:
        print(("out of date: " if args.check else "updated: ") + name)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
