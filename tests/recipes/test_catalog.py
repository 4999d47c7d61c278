"""Every published recipe parses, validates and fits its declared hardware; the catalog cannot drift."""

from __future__ import annotations

import pytest

from hf_ftkit.recipes import load_recipe, plan_recipe
from hf_ftkit.recipes.catalog import catalog, plan_line, recipe_files, render_readme
from tests.recipes.conftest import ROOT

RECIPES = recipe_files(ROOT / "recipes")
# one worker plans every recipe, so that Gemma 2's traced layers (a minute on a cold cache) are traced once
pytestmark = pytest.mark.xdist_group("recipe_catalog")


def test_the_catalog_has_at_least_twelve_recipes_covering_every_method_and_sharding():
    planned = [plan_recipe(load_recipe(p)) for p in RECIPES]
    assert len(RECIPES) >= 12
    assert {p.setup.inputs.method for p in planned} >= {"full", "lora", "dora", "qlora"}
    assert {p.setup.inputs.shard for p in planned} >= {"none", "fsdp", "zero3"}
    assert any(p.hardware and p.hardware.gpus > 1 for p in planned)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_parses_validates_and_fits_its_declared_hardware(path):
    recipe = load_recipe(path)
    planned = plan_recipe(recipe)
    assert recipe.ftkit.hardware, "every recipe declares its hardware"
    assert planned.fits is True, f"{path}: planned {planned.plan.peak_bytes} bytes > {planned.budget_label}"
    header = path.read_text().split("\n\n", 1)[0]
    for part in ("# Launch:", "# Hardware:", "# Override:"):
        assert part in header, f"{path}: the opening comment needs {part}"
    assert plan_line(planned) in header, f"{path}: stale '# Plan:' line; run scripts/build_recipes_readme.py"


def test_recipes_readme_is_generated_from_the_recipes():
    rows = [row for row, _ in catalog(ROOT / "recipes")]
    assert (ROOT / "recipes" / "README.md").read_text() == render_readme(rows)
