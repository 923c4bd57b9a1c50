"""A student copy of the exercises, without the solutions: `python -m tools.student_copy OUT`.

OUT/ receives the four exercise notebooks without their solution cells, `checks.py`, and
`fixtures.pt`: the reference values the checks compare with, recorded from the project's own
functions on the checks' own (seeded) inputs. Nothing in OUT imports the project, so an instructor
can hand it out without the solutions and the checks still pass on a correct answer and name the
mistake in a wrong one. It needs only torch, numpy and diffusers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
from pathlib import Path

import nbformat
import torch

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ROOT / "notebooks" / "exercises"
SOURCES = ROOT / "notebooks" / "src" / "exercises"
# Exercise 5 trains through the project's loop and exercise 6 breaks it: both need the repository.
NEEDS_THE_PROJECT = ("ex5_your_ddpo_trains", "ex6_failure_modes")
REQUIREMENTS = "torch\nnumpy\ndiffusers\njupyterlab\n"
README = """# DDPO exercises

Four exercises, one function each: open them with `jupyter lab` (after
`pip install -r requirements.txt`) and fill in the cells marked `# YOUR CODE HERE`. The last cell of
each notebook checks your function: it prints a line per test and `match: True` when everything
agrees with the reference, or names the mistake it recognises. The reference values are stored in
`fixtures.pt`; `checks.py` computes the usual mistakes from the same inputs to recognise them.
"""


def _frozen(value):
    """A recorded reference value with no autograd history, on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def record_fixtures() -> dict:
    """Run every check on the project's reference functions and keep what `reference()` computed."""
    sys.path.insert(0, str(EXERCISES))
    import checks

    import ddpo_min
    import sampler

    if checks.FROZEN:
        raise RuntimeError("checks.py runs from fixtures here: record them inside the repository")
    checks._TAPE.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        checks.check_logprob_step(sampler.ddim_step_with_logprob)
        checks.check_sf_loss(ddpo_min.ddpo_sf_loss)
        checks.check_clipped_loss(ddpo_min.ddpo_is_loss)
        checks.check_advantages(checks.reference_batch_advantages)
        checks.check_clip_advantages(ddpo_min.clip_advantages)
    return {k: _frozen(v) for k, v in checks._TAPE.items()}


def student_notebook(src: Path) -> nbformat.NotebookNode:
    """The exercise notebook without its solution cell and without the path to the project."""
    sys.path.insert(0, str(ROOT / "notebooks"))
    import build_notebooks

    keep = [line for line in src.read_text().splitlines()
            if not line.startswith(("SOLUTION_MODE =", "sys.path.insert(0, str(next("))]
    nb = build_notebooks.notebook_for(src)
    nb.cells = [c for c in build_notebooks.split_cells("\n".join(keep))
                if not (c.cell_type == "code" and c.source.startswith("if SOLUTION_MODE"))]
    for i, cell in enumerate(nb.cells):
        cell.id = f"{src.stem[:40]}-{i}".replace("_", "-")
    return nb


def make_copy(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(SOURCES.glob("ex*.py")):
        if src.stem in NEEDS_THE_PROJECT:
            continue
        nbformat.write(student_notebook(src), out / f"{src.stem}.ipynb")
    shutil.copy(EXERCISES / "checks.py", out / "checks.py")
    torch.save(record_fixtures(), out / "fixtures.pt")
    (out / "requirements.txt").write_text(REQUIREMENTS)
    (out / "README.md").write_text(README)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tools.student_copy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder to write (created)")
    out = make_copy(p.parse_args().out)
    print(f"student copy in {out}: " + ", ".join(sorted(f.name for f in out.iterdir())))


if __name__ == "__main__":
    main()
