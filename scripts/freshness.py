"""Which code each benchmark page measured, so that a page cannot silently outlive it.

Every page under ``docs/benchmarks/`` carries ``<!-- measured: HASH -->``: a hash of the files its
benchmark measures (``MEASURED`` below: the benchmark script and the package modules whose behaviour it
times or checks), written by the benchmark when it writes the page. ``python scripts/build_docs.py
--check`` recomputes the hashes and fails on a page whose measured code has changed since: rerun that
benchmark (the page names its command) and commit the new page.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "docs" / "benchmarks"
MEASURED: dict[str, tuple[str, ...]] = {
    "planner.md": ("benchmarks/planner_accuracy.py", "benchmarks/data/published_peaks.json", "hf_ftkit/planner",
                   "hf_ftkit/data"),
    "reserved.md": ("benchmarks/reserved_accuracy.py", "benchmarks/data/published_peaks.json", "hf_ftkit/planner",
                    "hf_ftkit/data"),
    "sharded.md": ("benchmarks/sharded_trace.py", "hf_ftkit/planner", "hf_ftkit/data"),
    "zero3.md": ("benchmarks/zero3_trace.py", "benchmarks/sharded_trace.py", "hf_ftkit/planner", "hf_ftkit/data"),
    "callback_overhead.md": ("benchmarks/callback_overhead.py", "hf_ftkit/callbacks"),
    "forgetting_overhead.md": ("benchmarks/forgetting_overhead.py", "hf_ftkit/forgetting"),
    "merge.md": ("benchmarks/merge.py", "hf_ftkit/merge"),
    "gpu_check.md": ("benchmarks/gpu_check.py", "hf_ftkit/planner", "hf_ftkit/data"),
    "architectures.md": ("benchmarks/architectures.py", "hf_ftkit/planner", "hf_ftkit/data"),
    "bnb_legacy.md": ("benchmarks/bnb_legacy.py", "benchmarks/data/published_peaks.json", "hf_ftkit/planner",
                      "hf_ftkit/data"),
}
STAMP = re.compile(r"<!-- measured: ([0-9a-f]{16}) -->")


def measured_hash(page: str) -> str:
    """A hash of the source files ``page``'s benchmark measures (paths and contents, in a stable order)."""
    digest = hashlib.sha256()
    for entry in MEASURED[page]:
        path = ROOT / entry
        files = sorted(p for p in path.rglob("*") if p.suffix in (".py", ".json")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def stamp(page: str) -> str:
    """The line a benchmark puts in the page it writes."""
    return f"<!-- measured: {measured_hash(page)} -->"


def stale_pages() -> list[str]:
    """Pages whose measured code changed since they were written, or that carry no stamp, with the reason."""
    problems = []
    for page in sorted(p.name for p in PAGES.glob("*.md")):
        if page not in MEASURED:
            problems.append(f"docs/benchmarks/{page}: no entry in scripts/freshness.py MEASURED")
            continue
        found = STAMP.search((PAGES / page).read_text())
        if found is None:
            problems.append(f"docs/benchmarks/{page}: records no measured-code stamp; rerun its benchmark")
        elif found.group(1) != measured_hash(page):
            problems.append(f"docs/benchmarks/{page}: the code it measured ({', '.join(MEASURED[page])}) changed "
                            f"since; rerun its benchmark")
    return problems
