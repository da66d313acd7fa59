"""The README's result tables are the committed docs/ files, and defaults follow from them."""

import importlib.util
import re
from pathlib import Path

from pangkas.weights.sparse import DEFAULT_MIN_SPARSITY

ROOT = Path(__file__).resolve().parent.parent
# Loaded by path: benchmarks/ is a folder of scripts, not a package to put on sys.path.
_spec = importlib.util.spec_from_file_location("update_readme", ROOT / "benchmarks" / "update_readme.py")
update_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(update_readme)


def test_readme_tables_match_docs():
    readme = (ROOT / "README.md").read_text()
    blocks = update_readme.BLOCK.findall(readme)
    assert len(blocks) >= 2
    assert update_readme.render(readme) == readme, "run benchmarks/update_readme.py"


def test_no_benchmark_script_shadows_a_module():
    """A script runs with benchmarks/ first on sys.path: one named like a package it (or torch)
    imports, e.g. transformers.py, would be imported in its place."""
    scripts = [p.stem for p in (ROOT / "benchmarks").glob("*.py")]
    assert "update_readme" in scripts
    shadowing = [name for name in scripts if importlib.util.find_spec(name) is not None]
    assert not shadowing


def test_every_reproduce_line_names_a_benchmark_script():
    lines = [m for page in (ROOT / "docs").glob("*.md")
             for m in re.findall(r"Reproduce: `\.venv/bin/python (benchmarks/\S+\.py)`", page.read_text())]
    assert len(lines) >= 5
    assert [path for path in lines if not (ROOT / path).is_file()] == []


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test" in ci


def test_default_min_sparsity_is_the_measured_crossover():
    text = (ROOT / "docs" / "sparse_kernels.md").read_text()
    match = re.search(r"win from \*\*(\d+)%\*\*", text)
    if match:
        assert DEFAULT_MIN_SPARSITY == int(match[1]) / 100
    else:  # never won: sparse execution must be off by default
        assert DEFAULT_MIN_SPARSITY == 1.0
