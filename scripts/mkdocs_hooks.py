"""MkDocs hooks: pages generated from the code while the site builds, so they cannot drift.

- ``cli.md``: the ``<!-- cli-reference -->`` marker becomes every subcommand's ``--help``, from the parsers;
- ``catalog.md``: the ``<!-- recipes-catalog -->`` marker becomes ``recipes/README.md`` (itself generated from the
  recipes and checked by ``scripts/build_docs.py --check``), with recipe links turned into repository paths.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cli_reference() -> str:
    """Markdown with ``hf-ftkit --help`` and each subcommand's help, rendered at a fixed width."""
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal width; fix it for a stable page
    from hf_ftkit.cli.main import make_parser

    parser = make_parser()
    parts = ["## hf-ftkit", "", "```text", parser.format_help().rstrip(), "```", ""]
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    helps = {choice.dest: choice.help for choice in subcommands._choices_actions}
    for name, sub in subcommands.choices.items():
        parts += [f"## hf-ftkit {name}", "", helps.get(name) or "", "", "```text", sub.format_help().rstrip(),
                  "```", ""]
    return "\n".join(parts)


def recipes_catalog() -> str:
    text = (ROOT / "recipes" / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"^# Recipes\n", "", text)
    text = text.replace("[docs/recipes.md](../docs/recipes.md)", "[recipes](recipes.md)")
    return re.sub(r"\[([^\]]+\.yaml)\]\(([^)]+\.yaml)\)", r"`recipes/\1`", text)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri == "cli.md":
        return markdown.replace("<!-- cli-reference -->", cli_reference())
    if page.file.src_uri == "catalog.md":
        return markdown.replace("<!-- recipes-catalog -->", recipes_catalog())
    return markdown
