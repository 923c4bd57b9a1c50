"""The autograder (tools/autograde.py): a correct submission, written from the exercises' text,
scores full marks; each mutant (one mistake, a memorised answer, an import of the project, a run
folder that is not the calibrated run) scores below."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ddpo_min
import sampler
from config import Config
from tools import autograde, ex5

STUDENT = Path(__file__).parent / "a_student" / "my_ddpo.py"
SOURCE = STUDENT.read_text()
SEEDS = (11,)


def _submission(folder: Path, source: str = SOURCE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_ddpo.py").write_text(source)
    return folder


def _mutant(old: str, new: str) -> str:
    assert SOURCE.count(old) == 1, old
    return SOURCE.replace(old, new)


def test_a_correct_submission_scores_full_marks(tmp_path):
    result = autograde.grade(_submission(tmp_path / "right"), SEEDS, ex5_runs=False)
    assert result["points"] == result["max"] == 19, result["items"]


def _memorised_advantages() -> str:
    """Right on the notebook's inputs only (their first reward recognised), sign-flipped on
    any other: what a student who fitted the visible check would hand in."""
    import checks

    _, rewards = checks.advantage_inputs()
    return _mutant("    return out\n", f"    return out if abs(rewards[0] - {rewards[0]!r}) < 1e-9 "
                                       "else -out\n")


MUTANTS = {
    "ex1_check": _mutant('if config.prediction_type == "epsilon":', "if True:"),
    "ex2_check": _mutant("return -(advantages.detach() * log_prob).mean()",
                         "return (advantages.detach() * log_prob).mean()"),
    "ex3_check": _mutant("torch.maximum(unclipped, clipped)", "torch.minimum(unclipped, clipped)"),
    "ex4_check": _mutant("mask = groups == prompt", "mask = groups == groups"),
}


@pytest.mark.parametrize("item", sorted(MUTANTS))
def test_a_mistake_costs_its_exercise(tmp_path, item):
    result = autograde.grade(_submission(tmp_path / item, MUTANTS[item]), SEEDS, ex5_runs=False)
    lost = {name for name, i in result["items"].items() if i["points"] < i["max"]}
    assert lost == {item}, result["items"]


def test_correct_code_passes_every_hidden_input_and_copied_constants_fail_every_one(tmp_path):
    """Instructors pick their own hidden seeds: on each of 30, the reference functions and the
    independently written student pass every check, and the two constant-copy mutants (the
    notebook's clip range, its max_abs) fail theirs."""
    import checks

    student = autograde.load_student(STUDENT)
    copied = autograde.load_student(_submission(tmp_path / "eps", _mutant(
        "torch.clamp(ratio, 1 - clip_range, 1 + clip_range)", "torch.clamp(ratio, 0.9, 1.1)"))
        / "my_ddpo.py")
    clipped = autograde.load_student(_submission(tmp_path / "max_abs", _mutant(
        "return advantages.clip(-max_abs, max_abs)", "return advantages.clip(-5.0, 5.0)"))
        / "my_ddpo.py")
    references = dict(check_logprob_step=sampler.ddim_step_with_logprob,
                      check_sf_loss=ddpo_min.ddpo_sf_loss, check_clipped_loss=ddpo_min.ddpo_is_loss,
                      check_advantages=checks.reference_batch_advantages,
                      check_clip_advantages=ddpo_min.clip_advantages)
    for seed in range(1, 31):
        for _, pairs in autograde.CODE_ITEMS.values():
            for check, function in pairs:
                mine = getattr(student, function)
                for fn in (references[check], mine):
                    assert autograde.run_check(check, fn, seed)[0], (check, seed, fn)
        assert not autograde.run_check("check_clipped_loss", copied.my_clipped_loss, seed)[0]
        assert not autograde.run_check("check_clip_advantages", clipped.my_clip_advantages,
                                       seed)[0]


def test_hidden_inputs_catch_a_memorised_answer(tmp_path):
    sub = _submission(tmp_path / "memorised", _memorised_advantages())
    visible = autograde.grade(sub, seeds=(), ex5_runs=False)["items"]["ex4_check"]
    hidden = autograde.grade(sub, SEEDS, ex5_runs=False)["items"]["ex4_check"]
    assert visible["points"] == 3 and hidden["points"] == 0, hidden
    assert "inputs 11" in hidden["detail"]


@pytest.mark.parametrize("item, old, new", [
    ("ex3_check", "torch.clamp(ratio, 1 - clip_range, 1 + clip_range)",
     "torch.clamp(ratio, 1 - 0.1, 1 + 0.1)"),
    ("ex4_check", "return advantages.clip(-max_abs, max_abs)", "return advantages.clip(-5.0, 5.0)"),
], ids=["clip-range", "max-abs"])
def test_hidden_inputs_catch_a_constant_copied_from_the_notebook(tmp_path, item, old, new):
    """The notebook's checks use clip range 0.1 and max_abs 5; the hidden inputs draw others."""
    sub = _submission(tmp_path / item, _mutant(old, new))
    visible = autograde.grade(sub, seeds=(), ex5_runs=False)["items"][item]
    hidden = autograde.grade(sub, SEEDS, ex5_runs=False)["items"][item]
    assert visible["points"] == visible["max"] and hidden["points"] < hidden["max"], hidden


@pytest.mark.parametrize("line, named", [
    ("from sampler import ddim_step_with_logprob", "sampler"),
    ("ddim = __import__('importlib').import_module('sampler')", "__import__()"),
    ("import importlib", "importlib"),
    ("import sys\nddim = sys.modules['sampler']", "sys.modules"),
    ("import checks", "checks"),
], ids=["import", "__import__", "importlib", "sys.modules", "checks"])
def test_reaching_the_project_scores_no_code_points(tmp_path, line, named):
    source = SOURCE + f"\n{line}  # noqa\n"
    result = autograde.grade(_submission(tmp_path / "imports", source), SEEDS, ex5_runs=False)
    assert result["points"] == 0 and named in result["items"]["ex1_check"]["detail"]


TOY = dict(num_steps=4, sample_batch_size=8, sample_batches=1, samples_per_prompt=4,
           stat_buffer=4, stat_min_count=4, train_batch_size=4, minibatches=2, device="cpu")


def test_exercise_5_is_graded_from_the_runs_weights(tmp_path, monkeypatch):
    """The bar is judged on the held-out set measured again from each run's weights; a run with
    another config or another epoch count does not count."""
    monkeypatch.setattr(ex5.tiny, "ANIMAL_PROMPTS", ex5.tiny.ANIMAL_PROMPTS[:4])
    sub = _submission(tmp_path / "sub")
    for reward in ex5.REWARDS:
        ddpo_min.train(Config.tiny(epochs=1, reward=reward, output_dir=str(sub / "ex5" / reward),
                                   **TOY))
    calibration = dict(epochs=1, settings=TOY, clipfrac_bar=1.0, bars={
        "compressibility": dict(direction="down", bar_percent=-100.0),
        "incompressibility": dict(direction="up", bar_percent=-100.0)})
    right = autograde.grade_ex5(sub, calibration)
    assert right["points"] == 4 and set(right["change_percent"]) == set(ex5.REWARDS), right
    assert all(np.isfinite(list(right["change_percent"].values())))
    # the same weights against a bar no tiny run reaches
    strict = {**calibration, "bars": {r: {**b, "bar_percent": 90.0}
                                      for r, b in calibration["bars"].items()}}
    assert autograde.grade_ex5(sub, strict)["points"] == 0
    # the same weights with a trust region no run keeps (its clip fraction is read from the run)
    clipped = autograde.grade_ex5(sub, {**calibration, "clipfrac_bar": -1.0})
    assert clipped["points"] == 0 and "clipfrac median" in clipped["detail"]
    # a run trained with another learning rate
    wrong = tmp_path / "wrong"
    shutil.copytree(sub, wrong)
    cfg_path = wrong / "ex5" / "compressibility" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "lr": 1e-2}))
    result = autograde.grade_ex5(wrong, calibration)
    assert result["points"] == 0 and "lr" in result["detail"]
    # a config.json with the learning rate taken out (a field left out is not a field that agrees)
    cfg_path.write_text(json.dumps({k: v for k, v in json.loads(cfg_path.read_text()).items()
                                    if k != "lr"}))
    result = autograde.grade_ex5(wrong, calibration)
    assert result["points"] == 0 and "lacks lr" in result["detail"]
    # a run with more epochs than the bar is set for
    more = {**calibration, "epochs": 2}
    assert "epochs" in autograde.grade_ex5(sub, more)["detail"]


def test_the_command_writes_the_grades(tmp_path, capsys):
    sub = _submission(tmp_path / "cli")
    assert autograde.main([str(sub), "--seeds", "11", "--no-ex5"]) == 0
    grades = json.loads((sub / "grades.json").read_text())
    assert grades["points"] == 19 and "total 19/19" in capsys.readouterr().out
    assert autograde.main([str(tmp_path / "missing")]) == 2
