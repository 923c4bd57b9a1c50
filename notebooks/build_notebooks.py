"""Build notebooks/**/*.ipynb from their sources, notebooks/src/**/*.py (percent format).

The sources are plain Python files in the "percent" format that Jupytext, VS Code and Spyder read:

    # %% [markdown]
    # # A title
    # Prose, with LaTeX: $\\nabla_\\theta \\log p_\\theta$.

    # %%
    x = 1  # a code cell

Why: a .py source diffs and reviews like code, ruff lints it, and the .ipynb files that people
open are generated from it with no outputs (outputs are never committed). Edit the source, then run

    python notebooks/build_notebooks.py           # write the .ipynb files
    python notebooks/build_notebooks.py --check   # exit 1 if an .ipynb is missing or stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
CELL = "# %%"
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}
TIMEOUT_S = 600  # per-cell limit for nbmake / nbclient (the longest notebook takes ~2-3 minutes)


def split_cells(text: str) -> list[nbformat.NotebookNode]:
    """Percent-format source -> notebook cells. Markdown cells lose their leading '# '."""
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                             for line in body.split("\n"))
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif kind == "code" and body:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.split("\n"):
        if line.startswith(CELL):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def notebook_for(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = split_cells(src.read_text())
    # stable ids: rebuilding an unchanged source changes nothing
    for i, cell in enumerate(nb.cells):
        cell.id = f"{src.stem[:40]}-{i}".replace("_", "-")
    nb.metadata = {
        "kernelspec": KERNEL,
        "language_info": {"name": "python"},
        "execution": {"timeout": TIMEOUT_S},  # read by nbmake
    }
    return nb


def targets() -> list[tuple[Path, Path]]:
    return [(src, HERE / src.relative_to(SRC).with_suffix(".ipynb"))
            for src in sorted(SRC.rglob("*.py"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="only verify the .ipynb files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for src, out in targets():
        text = nbformat.writes(notebook_for(src)) + "\n"
        if args.check:
            if not out.exists() or out.read_text() != text:
                stale.append(str(out.relative_to(HERE.parent)))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            print(f"wrote {out.relative_to(HERE.parent)}")
    if stale:
        print("out of date (run `python notebooks/build_notebooks.py`):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
