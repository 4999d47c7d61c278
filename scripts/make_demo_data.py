"""Writes the demo task's data: dates in many written forms, to be answered in ISO 8601 (YYYY-MM-DD).

A narrow task a small model does not solve reliably out of the box and learns in minutes; the answer is
exact, so the task metric is exact-match accuracy. Prompt-completion rows in TRL's conversational form.
Deterministic (fixed seed); the files are committed, so recipes and experiments run offline.

    python scripts/make_demo_data.py   # writes recipes/data/iso_dates/{train,test}.jsonl
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "recipes" / "data" / "iso_dates"
INSTRUCTIONS = (
    "Write this date in ISO 8601 format: {}",
    "Convert to YYYY-MM-DD: {}",
    "What is {} in ISO 8601 date format?",
    "Give the ISO date (YYYY-MM-DD) for: {}",
)


def ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def written(date: dt.date, rng: random.Random) -> str:
    month, abbr = date.strftime("%B"), date.strftime("%b")
    forms = (
        f"{month} {date.day}, {date.year}",
        f"{date.day} {month} {date.year}",
        f"{date.strftime('%A')}, {month} {ordinal(date.day)} {date.year}",
        f"the {ordinal(date.day)} of {month}, {date.year}",
        f"{abbr}. {date.day} {date.year}",
        f"{date.day:02d}/{date.month:02d}/{date.year} (day/month/year)",
        f"{date.month}/{date.day}/{date.year} (US style)",
        f"{date.day}.{date.month}.{date.year}",
    )
    return rng.choice(forms)


def rows(count: int, rng: random.Random, seen: set[dt.date]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    while len(out) < count:
        date = dt.date(1900, 1, 1) + dt.timedelta(days=rng.randrange(200 * 365))
        if date in seen:
            continue
        seen.add(date)
        prompt = rng.choice(INSTRUCTIONS).format(written(date, rng))
        out.append({"prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": date.isoformat()}]})
    return out


def main() -> None:
    rng, seen = random.Random(0), set()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", 2000), ("test", 200)):  # test dates never occur in train
        with (OUT / f"{name}.jsonl").open("w") as handle:
            for row in rows(count, rng, seen):
                handle.write(json.dumps(row) + "\n")
        print(f"wrote {count} rows to {OUT / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
