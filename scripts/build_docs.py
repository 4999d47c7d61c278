"""Regenerate everything the documentation shows that the project computes: one command.

- the `hf-ftkit compare` tables between ``<!-- BEGIN generated:NAME -->`` / ``<!-- END generated:NAME -->`` markers
  in ``docs/compare.md`` and ``docs/concepts.md``, and the compare plots in ``docs/images/``;
- ``recipes/README.md`` and the recipes' ``# Plan:`` lines (``scripts/build_recipes_readme.py``);
- the benchmark and experiment plots, redrawn from their committed results (``--from-results``; rerunning the
  measurements themselves is each benchmark script's job).

    python scripts/build_docs.py            # regenerate
    python scripts/build_docs.py --check    # exit 1 if a generated table or a benchmark page is out of date (CI)

A benchmark page is out of date when the code it measured changed after it was written (``scripts/freshness.py``).

The CLI reference is generated during ``mkdocs build`` itself (``scripts/mkdocs_hooks.py``), so it cannot drift.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from freshness import stale_pages  # noqa: E402  (a sibling script, not a package)

from hf_ftkit.cli.compare_cmd import comparison_markdown
from hf_ftkit.cli.plot import plot_comparison
from hf_ftkit.compare import compare_methods

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PRICE = 3.0  # an illustrative on-demand price per GPU-hour; the pages say so

# name -> (model, gpu, tokens, plot file or None)
TABLES = {
    "compare-8b-h100": ("meta-llama/Llama-3.1-8B", "h100", 50_000_000, "compare_8b_h100.png"),
    "compare-8b-rtx4090": ("meta-llama/Llama-3.1-8B", "rtx4090", 50_000_000, None),
    "compare-70b-h100": ("meta-llama/Llama-3.1-70B", "h100", 50_000_000, "compare_70b_h100.png"),
    "compare-70b-rtx4090": ("meta-llama/Llama-3.1-70B", "rtx4090", 50_000_000, None),
    "concepts-8b-a100": ("meta-llama/Llama-3.1-8B", "a100-80gb", 100_000_000, None),
}
PAGES = (DOCS / "compare.md", DOCS / "concepts.md")
BLOCK = re.compile(r"(<!-- BEGIN generated:(?P<name>[\w-]+) -->\n)(.*?)(<!-- END generated:(?P=name) -->)", re.S)


def block(name: str, plots: bool) -> str:
    model, gpu, tokens, image = TABLES[name]
    result = compare_methods(model, gpu=gpu, tokens=tokens, price_per_gpu_hour=PRICE)
    if plots and image:
        (DOCS / "images").mkdir(exist_ok=True)
        plot_comparison(result, DOCS / "images" / image)
    command = f"hf-ftkit compare {model} --gpu {gpu} --tokens {tokens // 1_000_000}M --price-per-gpu-hour {PRICE:g}"
    return f"`{command}`\n\n{comparison_markdown(result)}"


def update_pages(check: bool) -> list[str]:
    stale = []
    for page in PAGES:
        text = page.read_text()
        updated = BLOCK.sub(lambda m: m.group(1) + block(m.group("name"), not check) + m.group(4), text)
        if updated != text:
            stale.append(str(page.relative_to(ROOT)))
            if not check:
                page.write_text(updated)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated table is out of date")
    args = parser.parse_args()
    stale = update_pages(args.check)
    recipes = [sys.executable, str(ROOT / "scripts" / "build_recipes_readme.py")] + (["--check"] if args.check else [])
    recipes_ok = subprocess.run(recipes, check=False).returncode == 0
    if not args.check:
        for script in ("benchmarks/planner_accuracy.py", "benchmarks/forgetting_experiment.py"):
            subprocess.run([sys.executable, str(ROOT / script), "--from-results"], check=True,
                           stdout=subprocess.DEVNULL)
    for name in stale:
        print(("out of date: " if args.check else "updated: ") + name)
    benchmarks = stale_pages()
    for problem in benchmarks:
        print("out of date: " + problem)
    return 1 if args.check and (stale or not recipes_ok or benchmarks) else 0


if __name__ == "__main__":
    sys.exit(main())
