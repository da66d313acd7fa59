"""Every example in docs/extending.md runs as written (each block in a fresh namespace)."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


def test_the_page_shows_all_three_extension_points():
    assert len(BLOCKS) == 3
    assert "importance.register" in BLOCKS[0] and "@rule" in BLOCKS[1] and "Integration(" in BLOCKS[2]


@pytest.fixture
def registries_restored():
    """What an example registers is forgotten after it (other tests list the registered names)."""
    import pangkas

    kinds = [pangkas.importance, pangkas.integrations, pangkas.layer_importance, pangkas.weights.criteria]
    before = [set(kind.names()) for kind in kinds]
    yield
    for kind, names in zip(kinds, before):
        for name in set(kind.names()) - names:
            kind.unregister(name)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_extending_example_runs(index, registries_restored):
    exec(compile(BLOCKS[index], f"docs/extending.md example {index + 1}", "exec"), {"__name__": "docs_example"})
