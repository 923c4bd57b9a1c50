"""The student copy of the exercises (tools/student_copy.py): nothing in it imports the project, and
its checks, running from the recorded fixtures, pass on the reference solutions and name the
mistakes of the mutants, exactly as in the repository."""

from __future__ import annotations

import importlib.util
import re

import nbformat
import pytest
from test_notebooks import _is_loss, _student_step

import ddpo_min
import sampler
from tools.student_copy import make_copy


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    return make_copy(tmp_path_factory.mktemp("students") / "ddpo_exercises")


@pytest.fixture(scope="module")
def frozen_checks(copy):
    spec = importlib.util.spec_from_file_location("student_checks", copy / "checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.FROZEN  # no ddpo_min.py above the copy: the fixtures are used
    return module


def test_the_copy_has_no_solutions_and_no_project_imports(copy):
    names = sorted(p.name for p in copy.iterdir())
    assert names == ["README.md", "checks.py", "ex1_logprob_step.ipynb", "ex2_sf_loss.ipynb",
                     "ex3_clipped_loss.ipynb", "ex4_advantages.ipynb", "fixtures.pt",
                     "requirements.txt"]
    project = re.compile(r"^\s*(import|from)\s+(ddpo_min|sampler|config|rewards)\b", re.M)
    for path in copy.glob("*.ipynb"):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells
                         if c.cell_type == "code")
        assert "SOLUTION_MODE" not in code and not project.search(code), path.name
        assert "raise NotImplementedError" in code
    assert not project.search((copy / "checks.py").read_text().split("if FROZEN:")[0])


def test_frozen_checks_pass_on_the_references(frozen_checks, capsys):
    frozen_checks.check_logprob_step(sampler.ddim_step_with_logprob)
    frozen_checks.check_sf_loss(ddpo_min.ddpo_sf_loss)
    frozen_checks.check_clipped_loss(ddpo_min.ddpo_is_loss)
    frozen_checks.check_clip_advantages(ddpo_min.clip_advantages)
    assert capsys.readouterr().out.count("match: True") == 4


@pytest.mark.parametrize("mistake, needle", [("t-1 both", "not t - 1"), ("summed", "summed"),
                                             ("wrapped index", "final_alpha_cumprod")])
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


def test_an_unsolved_copied_notebook_fails_its_check(copy):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(copy / "ex2_sf_loss.ipynb", as_version=4)
    with pytest.raises(CellExecutionError, match="not implemented yet"):
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(copy)}}).execute()
