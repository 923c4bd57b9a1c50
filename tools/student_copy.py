"""The student release: what an instructor hands out. `python -m tools.student_copy OUT`.

OUT/ is a working copy of the project for students, laid out like the repository, with every answer
taken out:

- the package (ddpo_min.py, sampler.py, ...) with the **graded functions as stubs** that call the
  student's own code in `notebooks/exercises/my_ddpo.py` (through `_student.py`), so that the
  training loop, exercise 5 and exercise 6 run on the student's functions;
- notebooks 0-7, executed, with the cells that display a graded function's source emptied (notebook
  0 for reading: READ_ONLY);
- exercises 1-7 without their solution cells; `checks.py` with no reference formulas: it compares
  with `fixtures.pt`, the reference's outputs (and the usual mistakes' outputs) recorded on the
  checks' own inputs;
- the handout and the report template (not the rubric, the answers or INSTRUCTOR.md);
- the tiny model and the assets the notebooks read; `tools/check_setup.py`, a one-minute smoke
  check.

Nothing in OUT holds a reference implementation of a graded function (tests/test_student_copy.py
searches every file for their bodies). Add OUT to a fresh git repository to make a GitHub Classroom
template.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import shutil
import sys
from pathlib import Path

import nbformat
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXERCISES = NOTEBOOKS / "exercises"
SOURCES = NOTEBOOKS / "src" / "exercises"
RELEASE = Path(__file__).resolve().parent / "release"

PACKAGE = ("config.py", "ddpo_min.py", "loading.py", "plumbing.py", "rewards.py", "sampler.py",
           "tiny.py", "requirements.txt", "pyproject.toml")
TOOLS = ("__init__.py", "check_setup.py", "compare.py", "ex5.py", "ex7.py", "tiny_data.py",
         "tiny_report.py", "tiny_train.py")  # compare.py: notebooks 5 and 7 show its report
# assets/ left out: the comparison's runs (the report is enough), the speed benchmarks, SD's
# configs, and exercise 7's expected numbers (the KL trade-off and the reference run), which its
# Part C asks for
ASSETS_LEFT_OUT = ("comparison", "kl_tradeoff*", "ex7_reference.json", "bench_speed*",
                   "bench_contention*", "bench_gpu*",  # (bench_learning_*: notebook 7 reads them)
                   "sd_v1_4")
READ_ONLY = {  # executed notebooks the release cannot re-run, and why
    "00_ddpo_in_2d.ipynb": "it runs the project's DDIM step on points in the plane, and this "
                           "release replaces that step by your exercise 1, written for images. "
                           "Read it with its outputs (they come from the repository); the other "
                           "notebooks re-run here."}
COURSE = ("HANDOUT.md", "REPORT_TEMPLATE.md")  # not RUBRIC.md or ANSWERS.md

_EX1 = ("left out of the student release: exercise 1 asks for the whole step "
        "(my_ddim_step_with_logprob in notebooks/exercises/my_ddpo.py)")


def _left_out(what: str) -> tuple[str, str]:
    return (f"{what} Left out of the student release (exercise 1's answer).",
            f"raise NotImplementedError({_EX1!r})")


# module -> {function (Class.method for a method): (docstring, body)}
GRADED: dict[str, dict[str, tuple[str, str]]] = {
    "sampler.py": {
        "step_constants": _left_out("alphā_t, alphā_{t-1} and sigma_t of a step."),
        "predicted_x0_and_eps": _left_out("x̂_0 and eps_theta from the model output."),
        "ddim_mean": _left_out("The policy's mean mu_theta."),
        "gaussian_log_prob": _left_out("log N(x_{t-1} | mu_theta, sigma_t^2 I), averaged."),
        "ddim_step_mean": (
            "The Gaussian policy of one step (Eq. 2): mu_theta (B, C, H, W) and sigma_t (B,),\n"
            "read off your exercise 1 step (_student.step_mean says how).",
            "import _student\n\n"
            "return _student.step_mean(scheduler, model_output, timestep, sample, eta)"),
        "step_sigmas": (
            "sigma_t of each sampling step, (T,), read off your exercise 1 step.",
            "import _student\n\n"
            "timesteps = torch.as_tensor(timesteps).long().cpu()\n"
            "zeros = torch.zeros(len(timesteps), 1, 1, 1)\n"
            "return _student.step_mean(scheduler, zeros, timesteps, zeros, eta)[1]"),
        "ddim_step_with_logprob": (
            "One DDIM step as the Gaussian policy of Eq. 2: (x_{t-1}, log p(x_{t-1} | x_t, c)).\n\n"
            "In the student release this is your exercise 1 (my_ddim_step_with_logprob in\n"
            "notebooks/exercises/my_ddpo.py), called once per sample.",
            "import _student\n\n"
            "return _student.step(scheduler, model_output, timestep, sample, eta, prev_sample,\n"
            "                     generator)"),
    },
    "ddpo_min.py": {
        "ddpo_sf_loss": (
            "DDPO_SF's loss (Sec. 4.3): your exercise 2 (my_sf_loss in my_ddpo.py).",
            "import _student\n\nreturn _student.mine().my_sf_loss(log_prob, advantages)"),
        "ddpo_is_loss": (
            "DDPO_IS's clipped loss (Sec. 4.3): your exercise 3 (my_clipped_loss in my_ddpo.py).",
            "import _student\n\n"
            "return _student.mine().my_clipped_loss(log_prob, old_log_prob, advantages, "
            "clip_range)"),
        "clip_advantages": (
            "A <- clip(A, -max_abs, max_abs): your exercise 4 (my_clip_advantages).",
            "import _student\n\nreturn _student.mine().my_clip_advantages(advantages, max_abs)"),
        "PerPromptStatTracker.update": (
            "Per-prompt advantages: your exercise 4 (my_advantages in my_ddpo.py), on this\n"
            "batch.\n\n"
            "The student release normalises each batch on its own: the project's tracker also\n"
            "keeps a buffer of each prompt's earlier rewards, which at the tiny defaults (8\n"
            "different prompts per epoch, 8 samples each, a buffer of 8) changes nothing.",
            "import _student\n\n"
            "r = torch.as_tensor(rewards).detach().cpu().double().numpy().reshape(-1)\n"
            "return np.asarray(_student.mine().my_advantages(list(prompts), r), dtype=np.float32)"),
    },
}
# the notebook cells that display a graded function's source, and the exercise that asks for it
SHOWN = {"sampler.ddim_step_mean": 1, "sampler.gaussian_log_prob": 1,
         "sampler.ddim_step_with_logprob": 1, "ddpo_sf_loss": 2, "ddpo_is_loss": 3,
         "PerPromptStatTracker.update": 4, "clip_advantages": 4}


def _definitions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Top-level functions by name and methods as Class.method."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
    return found


def stub_module(source: str, stubs: dict[str, tuple[str, str]]) -> str:
    """`source` with the body (docstring included) of each function in `stubs` replaced; the
    signatures stay."""
    lines = source.splitlines(keepends=True)
    found = _definitions(ast.parse(source))
    missing = set(stubs) - set(found)
    if missing:
        raise KeyError(f"no function {sorted(missing)} to stub: update tools/student_copy.GRADED")
    for name in sorted(stubs, key=lambda n: -found[n].lineno):  # bottom up: line numbers hold
        node = found[name]
        first = node.body[0]
        indent = " " * first.col_offset
        docstring, body = stubs[name]
        doc = ('"""' + docstring + '"""').splitlines()
        text = "".join(indent + line + "\n" if line else "\n" for line in doc + body.splitlines())
        lines[first.lineno - 1 : node.end_lineno] = [text]
    return "".join(lines)


def strip_checks(source: str) -> str:
    """checks.py for the release: every reference value from fixtures.pt (the compute argument of
    each `reference(key, compute)` call becomes None), no import of the project, and none of the
    helpers that computed the reference or the mistakes' outputs."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []  # (start line, start col, end line, end col, replacement)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "reference" and len(node.args) == 2):
            arg = node.args[1]
            edits.append((arg.lineno, arg.col_offset, arg.end_lineno, arg.end_col_offset, "None"))
    for node in tree.body:  # FROZEN = ...: always the fixtures; the project's import block goes
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "FROZEN":
            edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset,
                          "FROZEN = True  # the student release: references from fixtures.pt"))
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "FROZEN":
            edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset,
                          "_FIXTURES: dict = torch.load(FIXTURES, weights_only=False)"))
    for l0, c0, l1, c1, text in sorted(edits, reverse=True):
        head, tail = lines[l0 - 1][:c0], lines[l1 - 1][c1:]
        lines[l0 - 1 : l1] = [head + text + tail]
    source = "".join(lines)
    while True:  # drop top-level functions nothing refers to any more, until none is left
        tree = ast.parse(source)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        unused = [n for n in tree.body if isinstance(n, ast.FunctionDef)
                  and not n.name.startswith("check_") and n.name not in used
                  and n.name not in ("hidden_inputs", "advantage_inputs")]
        if not unused:
            return source
        lines = source.splitlines(keepends=True)
        for node in sorted(unused, key=lambda n: -n.lineno):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            end = node.end_lineno
            while end < len(lines) and not lines[end].strip():  # the blank lines after it
                end += 1
            del lines[start - 1 : end]
        source = "".join(lines)


def _frozen(value):
    """A recorded reference value with no autograd history, on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def record_fixtures() -> dict:
    """Run every check on the project's reference functions and keep what `reference()` computed:
    the reference's outputs and the usual mistakes' outputs, on the checks' own inputs."""
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
        checks.check_gaussian_kl(sampler.gaussian_kl)
    return {k: _frozen(v) for k, v in checks._TAPE.items()}


def student_notebook(src: Path) -> nbformat.NotebookNode:
    """An exercise notebook without its solution cells and without the path to the project."""
    sys.path.insert(0, str(NOTEBOOKS))
    import build_notebooks

    keep = [line for line in src.read_text().splitlines()
            if not line.startswith(("SOLUTION_MODE =", "sys.path.insert(0, str(next("))]
    nb = build_notebooks.notebook_for(src)
    nb.cells = [c for c in build_notebooks.split_cells("\n".join(keep))
                if not (c.cell_type == "code" and c.source.startswith("if SOLUTION_MODE"))]
    for i, cell in enumerate(nb.cells):
        cell.id = f"{src.stem[:40]}-{i}".replace("_", "-")
    return nb


def released_notebook(path: Path) -> nbformat.NotebookNode:
    """An executed notebook with the outputs of the cells that show a graded function's source
    replaced by a line saying which exercise asks for it."""
    nb = nbformat.read(path, as_version=4)
    if path.name in READ_ONLY:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(
            f"*In the student release this notebook is for reading, not re-running: "
            f"{READ_ONLY[path.name]}*"))
    for cell in nb.cells:
        if cell.cell_type != "code" or "show_source(" not in cell.source:
            continue
        asked = sorted({n for name, n in SHOWN.items() if name in cell.source})
        if asked:
            text = ("*The student release leaves this code out: exercise "
                    + " and ".join(map(str, asked)) + " asks you to write it.*")
            cell.outputs = [nbformat.v4.new_output("display_data",
                                                   data={"text/markdown": text,
                                                         "text/plain": text})]
    return nb


def make_copy(out: Path, mystery: str | None = None) -> Path:
    """Build the release in `out` (a new folder, or an earlier release there, which is replaced),
    with exercise 6's mystery run as committed, or a new one with the bug `mystery` planted."""
    if out.exists() and any(out.iterdir()) and not (out / "_student.py").exists():
        raise SystemExit(f"{out} exists and is not a student release: name a new folder")
    shutil.rmtree(out, ignore_errors=True)
    (out / "tools").mkdir(parents=True)
    for name in PACKAGE:
        text = (ROOT / name).read_text()
        if name in GRADED:
            text = stub_module(text, GRADED[name])
        (out / name).write_text(text)
    for name in TOOLS:
        shutil.copy(ROOT / "tools" / name, out / "tools" / name)
    shutil.copy(RELEASE / "_student.py", out / "_student.py")
    shutil.copy(RELEASE / "README.md", out / "README.md")
    shutil.copytree(ROOT / "assets", out / "assets",
                    ignore=shutil.ignore_patterns(*ASSETS_LEFT_OUT))
    (out / "notebooks" / "course").mkdir(parents=True)
    (out / "notebooks" / "exercises").mkdir()
    shutil.copy(NOTEBOOKS / "nbutils.py", out / "notebooks" / "nbutils.py")
    for executed in sorted((NOTEBOOKS / "executed").glob("0*.ipynb")):
        nbformat.write(released_notebook(executed), out / "notebooks" / executed.name)
    for name in COURSE:
        shutil.copy(NOTEBOOKS / "course" / name, out / "notebooks" / "course" / name)
    exercises = out / "notebooks" / "exercises"
    for src in sorted(SOURCES.glob("ex*.py")):
        nbformat.write(student_notebook(src), exercises / f"{src.stem}.ipynb")
    (exercises / "checks.py").write_text(strip_checks((EXERCISES / "checks.py").read_text()))
    shutil.copy(EXERCISES / "my_ddpo.py", exercises / "my_ddpo.py")
    torch.save(record_fixtures(), exercises / "fixtures.pt")
    if mystery:
        from tools import mystery as planted

        planted.make(mystery, exercises / "mystery")
    else:
        shutil.copytree(EXERCISES / "mystery", exercises / "mystery")
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tools.student_copy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder to write (new, or an earlier release)")
    p.add_argument("--mystery", default=None, metavar="BUG",
                   help="plant this bug in exercise 6's problem 6 instead of the committed one "
                        "(python -m tools.mystery --list; about 3 minutes)")
    args = p.parse_args()
    if args.mystery is None:
        print("warning: exercise 6's problem 6 gets the committed mystery run, whose bug this "
              "public repository names; plant another with --mystery (python -m tools.mystery "
              "--list)")
    out = make_copy(args.out, args.mystery)
    files = sum(1 for f in out.rglob("*") if f.is_file())
    print(f"student release in {out}: {files} files; see {out / 'README.md'}")


if __name__ == "__main__":
    main()
