"""The student release (tools/student_copy.py): it holds no answer (no reference body of a graded
function, no answer key, checks that compare with recorded outputs instead of formulas), its checks
pass on the references and name the mutants exactly as in the repository, and once a student fills
`my_ddpo.py` the release's own loop trains on the student's code exactly as the repository's harness
does with the same functions."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from test_notebooks import _is_loss, _student_step

import ddpo_min
import sampler
from tools import ex5
from tools.student_copy import GRADED, make_copy, strip_checks

STUDENT = Path(__file__).parent / "a_student" / "my_ddpo.py"
TOY = dict(num_steps=4, sample_batch_size=8, sample_batches=1, samples_per_prompt=4,
           stat_buffer=4, stat_min_count=4, train_batch_size=4, minibatches=2, grid_size=4,
           device="cpu")
METRICS = ("reward/mean", "reward/std", "loss/policy", "loss/approx_kl", "loss/clipfrac",
           "kl/pretrained")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_copy(tmp_path_factory.mktemp("students") / "ddpo_release")


@pytest.fixture(scope="module")
def frozen_checks(release):
    spec = importlib.util.spec_from_file_location(
        "student_checks", release / "notebooks" / "exercises" / "checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.FROZEN
    return module


def _texts(folder: Path):
    """(path, text) of every text file, notebooks as their sources and outputs."""
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".ipynb":
            nb = nbformat.read(path, as_version=4)
            parts = [c.source for c in nb.cells]
            parts += [json.dumps(o) for c in nb.cells for o in c.get("outputs", [])]
            yield path, "\n".join(parts)
        elif path.suffix in (".py", ".md", ".txt", ".json", ".toml"):
            yield path, path.read_text()


def _flat(text: str) -> str:
    """Text with comments' markers kept but all whitespace runs removed (formatting-blind)."""
    return re.sub(r"\s+", "", text)


def _body_lines(module, qualname: str) -> list[str]:
    """Every simple statement of a reference function at any depth (its docstring left out),
    whitespace removed: the pieces of an answer a release must not hold."""
    fn = module
    for part in qualname.split("."):
        fn = getattr(fn, part)
    source = textwrap.dedent(inspect.getsource(fn))
    node = ast.parse(source).body[0]
    docstring = node.body[0] if isinstance(node.body[0], ast.Expr) else None
    simple = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Expr, ast.Raise)
    return [_flat(ast.get_source_segment(source, s)) for s in ast.walk(node)
            if isinstance(s, simple) and s is not docstring
            and len(_flat(ast.get_source_segment(source, s))) >= 24]


def test_the_release_holds_no_answer(release):
    names = {p.name for p in release.rglob("*")}
    assert not names & {"ANSWERS.md", "RUBRIC.md", "INSTRUCTOR.md", "build_notebooks.py"}
    modules = {"sampler.py": sampler, "ddpo_min.py": ddpo_min}
    bodies = {q: _body_lines(modules[m], q) for m, stubs in GRADED.items() for q in stubs}
    assert all(bodies.values()) and sum(map(len, bodies.values())) > 40
    found = []
    for path, text in _texts(release):
        flat = _flat(text)
        found += [(path.name, q, line) for q, lines in bodies.items() for line in lines
                  if line in flat]
    assert not found, found[:5]


def test_the_release_leaves_out_exercise_7s_expected_numbers_and_marks_notebook_0(release):
    assert not list((release / "assets").glob("kl_tradeoff*"))
    assert not (release / "assets" / "ex7_reference.json").exists()
    first = nbformat.read(release / "notebooks" / "00_ddpo_in_2d.ipynb", as_version=4).cells[0]
    assert first.cell_type == "markdown" and "for reading" in first.source


def test_the_release_shows_the_comparison_that_notebooks_5_and_7_read(release):
    script = ("import sys; sys.path[:0] = ['.', 'notebooks']; import nbutils; "
              "s = nbutils.show_comparison(); print('RESULTS', len(s['results']))")
    out = subprocess.run([sys.executable, "-c", script], cwd=release, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULTS 2" in out.stdout


def test_the_answer_search_finds_an_answer(release, tmp_path):
    """The search above fails on a release that still holds one reference body."""
    leaky = tmp_path / "leaky"
    shutil.copytree(release, leaky)
    (leaky / "notes.py").write_text(inspect.getsource(ddpo_min.ddpo_is_loss))
    lines = _body_lines(ddpo_min, "ddpo_is_loss")
    assert lines and all(line in _flat(dict(_texts(leaky))[leaky / "notes.py"]) for line in lines)


def test_the_checks_compare_with_recorded_outputs_not_formulas(release):
    text = (release / "notebooks" / "exercises" / "checks.py").read_text()
    tree = ast.parse(text)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", "") == "reference"]
    assert len(calls) >= 7 and all(isinstance(c.args[1], ast.Constant) for c in calls)
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not defined & {"_expected_step", "_ddim_variant", "_tiny_variants", "_sigma",
                          "_expected_clipped_loss", "_expected_advantages", "_grad_of",
                          "reference_batch_advantages", "_step_pieces"}
    assert not re.search(r"^\s*(import|from)\s+(ddpo_min|sampler)\b", text, re.M)
    assert "np.clip(np.abs" not in text and "torch.maximum" not in text
    # the same stripping on a checks.py with one more formula helper strips that one too
    source = (Path(__file__).parents[1] / "notebooks/exercises/checks.py").read_text()
    extra = (source + "\n\ndef _leak():\n    return 1\n\n\n"
             'def check_x(fn):\n    reference("k", _leak)\n')
    assert "_leak" in extra and "def _leak" not in strip_checks(extra)


def test_exercise_notebooks_have_no_solution_cells(release):
    for path in (release / "notebooks" / "exercises").glob("ex*.ipynb"):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells
                         if c.cell_type == "code")
        assert "SOLUTION_MODE" not in code and "reference_functions" not in code, path.name
    for n in range(1, 5):
        path = next((release / "notebooks" / "exercises").glob(f"ex{n}_*.ipynb"))
        assert "raise NotImplementedError" in path.read_text()


def test_frozen_checks_pass_on_the_references(frozen_checks, capsys):
    frozen_checks.check_logprob_step(sampler.ddim_step_with_logprob)
    frozen_checks.check_sf_loss(ddpo_min.ddpo_sf_loss)
    frozen_checks.check_clipped_loss(ddpo_min.ddpo_is_loss)
    frozen_checks.check_advantages(ex5.reference_functions()["advantages"])
    frozen_checks.check_gaussian_kl(sampler.gaussian_kl)
    frozen_checks.check_clip_advantages(ddpo_min.clip_advantages)
    assert capsys.readouterr().out.count("match: True") == 6


@pytest.mark.parametrize("mistake, needle", [("t-1 both", "not t - 1"), ("summed", "summed"),
                                             ("wrapped index", "final_alpha_cumprod"),
                                             ("sd only", "the model output is v"),
                                             ("divides by zero", "must be 0")])
def test_frozen_checks_name_the_mutants(frozen_checks, mistake, needle):
    with pytest.raises(AssertionError, match=re.escape(needle)):
        frozen_checks.check_logprob_step(_student_step(mistake))


@pytest.mark.parametrize("variant, needle", [("min", "swapped"), ("kl rho", "not rho - 1")])
def test_frozen_clipped_loss_check_names_the_mutants(frozen_checks, variant, needle):
    if variant == "min":
        from test_notebooks import _clipped

        fn = _clipped("min")
    else:
        fn = _is_loss(variant)
    with pytest.raises(AssertionError, match=re.escape(needle)):
        frozen_checks.check_clipped_loss(fn)


def test_an_unsolved_release_notebook_fails_its_check(release):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    folder = release / "notebooks" / "exercises"
    nb = nbformat.read(folder / "ex2_sf_loss.ipynb", as_version=4)
    with pytest.raises(CellExecutionError, match="not implemented yet"):
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(folder)}}).execute()


def _toy_epoch_in(folder: Path, **overrides) -> dict:
    """One toy epoch of the release's own loop, run in a fresh interpreter inside `folder`."""
    script = textwrap.dedent(f"""
        import json, sys, tempfile
        sys.path.insert(0, ".")
        import ddpo_min
        from config import Config
        with tempfile.TemporaryDirectory() as d:
            run = ddpo_min.train(Config.tiny(epochs=1, output_dir=d, **{dict(TOY, **overrides)!r}))
            print("METRICS", (run / "metrics.jsonl").read_text().splitlines()[0])
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("METRICS ", 1)[1].splitlines()[0])


@pytest.fixture(scope="module")
def filled(release, tmp_path_factory):
    """The release with a student's my_ddpo.py, written from the exercises' text."""
    folder = tmp_path_factory.mktemp("filled") / "release"
    shutil.copytree(release, folder)
    shutil.copy(STUDENT, folder / "notebooks" / "exercises" / "my_ddpo.py")
    return folder


def test_a_filled_release_trains_on_the_students_code(filled, tmp_path):
    """The release's loop with a student's my_ddpo.py = the repository's loop with the same five
    functions patched in (exercise 5's harness): the same samples, losses and diagnostics."""
    got = _toy_epoch_in(filled)

    spec = importlib.util.spec_from_file_location("a_student", STUDENT)
    student = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(student)
    with ex5.student_loop(**ex5.functions_of(student)):
        from config import Config

        run = ddpo_min.train(Config.tiny(epochs=1, output_dir=str(tmp_path / "repo"), **TOY))
    want = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in METRICS[:-1]:
        assert got[key] == want[key], key
    # the KL diagnostic reads the policy's mean off the student's step instead of a closed form
    assert got["kl/pretrained"] == pytest.approx(want["kl/pretrained"], rel=1e-4)


def test_the_kl_leash_trains_through_the_students_step_in_the_release(filled, tmp_path):
    """Exercise 7 in the release: --kl-coef's penalty reads the policy's mean off the student's
    step (no closed form ships), and its gradient must reach the weights: the leashed epoch
    matches the repository's with the same functions, and ends nearer the pretrained policy than
    beta = 0 (it would not if the mean carried no gradient)."""
    settings = dict(lr=1e-3, kl_samples=2)
    free = _toy_epoch_in(filled, **settings)
    leashed = _toy_epoch_in(filled, kl_coef=1e4, **settings)
    assert leashed["kl/pretrained"] < free["kl/pretrained"]

    spec = importlib.util.spec_from_file_location("a_student", STUDENT)
    student = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(student)
    with ex5.student_loop(**ex5.functions_of(student)):
        from config import Config

        run = ddpo_min.train(Config.tiny(epochs=1, output_dir=str(tmp_path / "repo"), kl_coef=1e4,
                                         **settings, **TOY))
    want = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss/kl_penalty", "loss/policy", "kl/pretrained"):
        assert leashed[key] == pytest.approx(want[key], rel=1e-3), key


def test_the_release_checks_the_setup(release):
    out = subprocess.run([sys.executable, "-m", "tools.check_setup"], cwd=release,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "setup OK" in out.stdout and "exercise 5" in out.stdout


def test_a_filled_release_runs_exercise_6(filled):
    """Exercise 6 breaks the release's loop around the student's functions: every symptom it
    checks for is there, and problem 6's runs are shipped."""
    from nbclient import NotebookClient

    folder = filled / "notebooks" / "exercises"
    nb = nbformat.read(folder / "ex6_failure_modes.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []))
    assert printed.count("match: True") == 6 and "match: False" not in printed
