"""Copy the committed result tables from docs/ into README.md.

README.md marks each copy with ``<!-- include PATH -->`` ... ``<!-- end include -->``; this script
replaces what lies between with PATH's current text (its first heading dropped).

    .venv/bin/python benchmarks/update_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- include (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)


def included(path: str) -> str:
    """The text README.md should hold for ``path``: the file without its top-level heading."""
    lines = (ROOT / path).read_text().strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip() + "\n"


def render(readme: str) -> str:
    return BLOCK.sub(lambda m: m[1] + included(m["path"]) + m[4], readme)


def main() -> None:
    readme = ROOT / "README.md"
    readme.write_text(render(readme.read_text()))


if __name__ == "__main__":
    main()
