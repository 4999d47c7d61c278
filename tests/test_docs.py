"""The documentation site builds in strict mode, its generated parts are current, and strict mode bites."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=root, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a full docs build (about 20 s of the quick tier's 3 minutes); .ci/run builds it too
def test_site_builds_strict_with_generated_cli_reference_and_api(tmp_path):
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    from hf_ftkit.cli.main import make_parser

    subcommands = next(a for a in make_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in subcommands.choices:
        assert f'id="hf-ftkit-{name}"' in cli  # every subcommand has its section, from the parsers
    assert "--price-per-gpu-hour" in cli and "--quiet" in cli
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for path in ("planner.api.plan", "compare.methods.compare_methods", "forgetting.callback.ForgettingCallback",
                 "callbacks.memory.MemoryBudgetCallback", "merge.run.merge_adapters"):
        assert f'id="hf_ftkit.{path}"' in api  # a rendered docstring section per public entry point
    assert (tmp_path / "site" / "images" / "compare_70b_h100.png").is_file()


@pytest.mark.slow  # a subprocess or a full docs rebuild: the whole suite (CI) runs it
def test_generated_tables_are_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_docs.py"), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("breakage", ["link", "api"])
def test_strict_build_fails_on_a_broken_link_or_reference(tmp_path, breakage):
    copy = tmp_path / "repo"
    for name in ("docs", "scripts", "recipes"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("*.png", "__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", copy)
    shutil.copy(ROOT / "CHANGELOG.md", copy)
    shutil.copytree(ROOT / "hf_ftkit", copy / "hf_ftkit", ignore=shutil.ignore_patterns("__pycache__"))
    page = copy / "docs" / "concepts.md"
    extra = "\nSee [a page that is not there](missing.md).\n" if breakage == "link" else "\n::: hf_ftkit.no_such\n"
    page.write_text(page.read_text() + extra)
    result = build(copy, tmp_path / "site")
    assert result.returncode != 0
    assert ("missing.md" if breakage == "link" else "no_such") in result.stderr


def test_a_benchmark_page_goes_stale_when_the_code_it_measured_changes(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import freshness

    (tmp_path / "docs" / "benchmarks").mkdir(parents=True)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "bench.py").write_text("print()\n")
    monkeypatch.setattr(freshness, "ROOT", tmp_path)
    monkeypatch.setattr(freshness, "PAGES", tmp_path / "docs" / "benchmarks")
    monkeypatch.setattr(freshness, "MEASURED", {"page.md": ("bench.py", "pkg")})
    page = tmp_path / "docs" / "benchmarks" / "page.md"
    page.write_text("# numbers\n")
    assert "records no measured-code stamp" in freshness.stale_pages()[0]
    page.write_text("# numbers\n\n" + freshness.stamp("page.md") + "\n")
    assert freshness.stale_pages() == []
    (tmp_path / "pkg" / "mod.py").write_text("x = 2\n")
    assert "changed since; rerun its benchmark" in freshness.stale_pages()[0]
    (tmp_path / "docs" / "benchmarks" / "other.md").write_text("unlisted\n")
    assert any("no entry" in p for p in freshness.stale_pages())
