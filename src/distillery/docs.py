"""Generate the README's method list from the registry (never hand-kept).

    python -m distillery.docs        # rewrites the block between the markers in README.md

A test fails when README.md and the registry disagree.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

START, END = "<!-- methods:start -->", "<!-- methods:end -->"


def methods_markdown() -> str:
    from distillery.methods import available

    rows = ["| method | needs teacher | what it does | paper |", "|---|---|---|---|"]
    for spec in available().values():
        if spec.name.endswith("_for_test"):
            continue
        params = ", ".join(f"`{k}`" for k in spec.params.model_fields)
        rows.append(f"| `{spec.name}` | {'yes' if spec.needs_teacher else 'no'} | {spec.description} "
                    f"{'(params: ' + params + ')' if params else ''} | {spec.paper} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    block = f"{START}\n{methods_markdown()}\n{END}"
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("README.md")
    path.write_text(render(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
