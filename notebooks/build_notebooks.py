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
    python notebooks/build_notebooks.py --execute # executed copies in notebooks/executed/ (~8 min)

The executed copies are what a reader sees on GitHub without running anything: every output, plot
and `match: True`, with the exercises' reference solutions in place. Each records the hash of the
source it was executed from; the tests fail when a source changes and its copy is not re-executed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
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


EXECUTED = HERE / "executed"


def source_hash(src: Path) -> str:
    return hashlib.sha256(src.read_bytes()).hexdigest()


def executed_copy(src: Path) -> Path:
    return EXECUTED / src.relative_to(SRC).with_suffix(".ipynb")


def execute(src: Path) -> None:
    """Execute the notebook built from `src` as CI does (reference solutions, offline, no progress
    bars) and save it with its outputs and its source's hash."""
    from nbclient import NotebookClient

    nb = notebook_for(src)
    folder = HERE / src.relative_to(SRC).parent
    env = {"DDPO_SOLUTIONS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    os.environ.update(env)  # the kernel inherits them
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=KERNEL["name"],
                   resources={"metadata": {"path": str(folder)}}).execute()
    for cell in nb.cells:  # no machine paths in the saved outputs
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                output["text"] = scrub(output["text"])
    nb.metadata["ddpo"] = {"source": str(src.relative_to(HERE.parent)),
                           "source_sha256": source_hash(src)}
    out = executed_copy(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    print(f"executed {out.relative_to(HERE.parent)}", flush=True)


def scrub(text: str) -> str:
    """Output text without this machine's paths: the repository's becomes relative, a temporary
    folder's a placeholder."""
    text = text.replace(str(HERE.parent) + os.sep, "")
    return re.sub(r"(/tmp|/var/folders\S*?)/tmp\w+", "<a temporary folder>", text)


SHOWN = re.compile(r"^`(?P<path>[^`]+)`, line (?P<line>\d+):\n\n```python\n(?P<code>.*)```\s*$",
                   re.S)


def shown_code_changed(nb: nbformat.NotebookNode) -> list[str]:
    """The project code an executed notebook displays (nbutils.show_source) that no longer stands
    at the file and line shown: the copy then shows code the repository no longer has."""
    changed = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            m = SHOWN.match(output.get("data", {}).get("text/markdown", ""))
            if not m:
                continue
            path, start = HERE.parent / m["path"], int(m["line"])
            code = m["code"].splitlines()
            lines = path.read_text().splitlines() if path.exists() else []
            if lines[start - 1 : start - 1 + len(code)] != code:
                changed.append(f"{m['path']} line {start}")
    return changed


def stale_executed() -> list[str]:
    """Executed copies that are missing, were executed from another version of their source, or
    display project code that has changed since."""
    stale = []
    for src, _ in targets():
        out = executed_copy(src)
        nb = nbformat.read(out, as_version=4) if out.exists() else None
        meta = nb.metadata.get("ddpo", {}) if nb else {}
        if meta.get("source_sha256") != source_hash(src):
            stale.append(str(out.relative_to(HERE.parent)))
        elif changed := shown_code_changed(nb):
            stale.append(f"{out.relative_to(HERE.parent)} (shows {', '.join(changed)})")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="only verify the .ipynb files are up to date")
    parser.add_argument("--execute", nargs="*", metavar="NAME",
                        help="write executed copies to notebooks/executed/ (all, or those whose "
                        "source path contains NAME); only the stale ones with --stale")
    parser.add_argument("--stale", action="store_true", help="with --execute: only stale copies")
    args = parser.parse_args(argv)
    if args.execute is not None:
        stale = {name.split(" (")[0] for name in stale_executed()}
        for src, _ in targets():
            if args.execute and not any(name in str(src) for name in args.execute):
                continue
            if args.stale and str(executed_copy(src).relative_to(HERE.parent)) not in stale:
                continue
            execute(src)
        return 0
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
