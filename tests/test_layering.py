"""The architecture as the README draws it: modules in layers, each importing only from its own
layer or below, and no import cycle in src/ or benchmarks/ (checked with ``ast``)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "pangkas"
README = ROOT / "README.md"


def readme_layers() -> dict[str, int]:
    """Module path (relative to src/pangkas, a package as ``graph/``) -> its layer number."""
    section = README.read_text().split("## Layout", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    layers, current = {}, None
    for line in block.splitlines():
        if header := re.match(r"layer (\d+)\b", line):
            current = int(header.group(1))
        elif entry_line := re.match(r"  (\S+)", line):  # deeper indents continue a description
            entry = entry_line.group(1)
            assert current is not None and entry not in layers, f"README Layout: {entry} listed twice"
            layers[entry] = current
    return layers


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts]) if package else ".".join(parts)


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports, at module level or inside functions."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from x import y``: the module x.y if there is one, else x (y is a name in it)
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(root: Path, package: str) -> dict[str, set[str]]:
    files = {module_name(p, root, package): p for p in root.rglob("*.py")}
    return {name: imports(path, name, set(files)) for name, path in files.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None."""
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def layer_of(module: str, layers: dict[str, int]) -> int:
    relative = module.removeprefix("pangkas").lstrip(".").replace(".", "/")
    candidates = [relative + ".py", relative + "/__init__.py"]
    parts = relative.split("/")
    candidates += ["/".join(parts[:i]) + "/" for i in range(len(parts), 0, -1)]
    if not relative:
        candidates = ["__init__.py"]
    for candidate in candidates:
        if candidate in layers:
            return layers[candidate]
    raise AssertionError(f"README Layout does not place {module} in a layer")


def test_every_module_is_in_exactly_one_layer():
    layers = readme_layers()
    for module in graph(SOURCE, "pangkas"):
        layer_of(module, layers)
    listed_files = [entry for entry in layers if entry.endswith(".py")]
    for entry in listed_files:
        assert (SOURCE / entry).is_file(), f"README Layout lists {entry}, which does not exist"
    for entry in (e for e in layers if e.endswith("/")):
        assert (SOURCE / entry).is_dir(), f"README Layout lists {entry}, which does not exist"


def test_no_module_imports_from_a_higher_layer():
    layers = readme_layers()
    wrong = []
    for module, deps in graph(SOURCE, "pangkas").items():
        mine = layer_of(module, layers)
        wrong += [f"{module} (layer {mine}) imports {dep} (layer {layer_of(dep, layers)})"
                  for dep in deps if layer_of(dep, layers) > mine]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("root,package", [(SOURCE, "pangkas"), (ROOT / "benchmarks", "")])
def test_no_import_cycle(root, package):
    assert cycle(graph(root, package)) is None


def test_the_checks_can_fail():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert layer_of("pangkas.graph.rules", {"graph/": 2}) == 2
    with pytest.raises(AssertionError):
        layer_of("pangkas.nowhere", {"graph/": 2})
