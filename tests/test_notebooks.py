"""The notebooks are committed without outputs and in sync with their sources; the exercise
self-checks accept the reference and name the usual mistakes.

The notebooks themselves are executed by nbmake, which pyproject's addopts turn on for every pytest
run (`python -m pytest -q notebooks` for those alone); notebooks/conftest.py sets DDPO_SOLUTIONS=1,
so the exercises run with the reference solutions.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
sys.path.insert(0, str(NOTEBOOKS / "exercises"))

import build_notebooks  # noqa: E402
import checks  # noqa: E402  (notebooks/exercises/checks.py)

import ddpo_min  # noqa: E402
import sampler  # noqa: E402


def test_notebooks_are_built_from_their_sources():
    assert build_notebooks.main(["--check"]) == 0, (
        "run `python notebooks/build_notebooks.py`, commit the .ipynb")


def test_executed_copies_are_current():
    """notebooks/executed/ holds every notebook with its outputs, run from the current source."""
    stale = build_notebooks.stale_executed()
    assert not stale, ("re-execute: python notebooks/build_notebooks.py --execute --stale\n  "
                       + "\n  ".join(stale))


@pytest.mark.parametrize("path", sorted(p for p in NOTEBOOKS.rglob("*.ipynb")
                                        if "executed" not in p.parts), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: strip outputs")


def test_every_derivation_notebook_has_a_numeric_check():
    for src in sorted((NOTEBOOKS / "src").glob("0*.py")):
        assert "nbutils.check(" in src.read_text(), src.name


# --------------------------------------------------------------------------------------------------
# The exercise checkers: the reference passes, each typical mistake gets its own message
# --------------------------------------------------------------------------------------------------


def _fails_with(check, fn, needle: str) -> None:
    with pytest.raises(checks.ExerciseError) as info:
        check(fn)
    assert needle in str(info.value), str(info.value)


def test_checkers_accept_the_references(capsys):
    checks.check_logprob_step(sampler.ddim_step_with_logprob)
    checks.check_sf_loss(ddpo_min.ddpo_sf_loss)
    checks.check_clipped_loss(ddpo_min.ddpo_is_loss)
    checks.check_advantages(checks.reference_batch_advantages)
    checks.check_clip_advantages(ddpo_min.clip_advantages)
    assert capsys.readouterr().out.count("match: True") == 5


def test_checkers_report_unimplemented_exercises():
    def todo(*args, **kwargs):
        raise NotImplementedError

    for check in (checks.check_logprob_step, checks.check_sf_loss, checks.check_clipped_loss,
                  checks.check_advantages, checks.check_clip_advantages):
        _fails_with(check, todo, "not implemented yet")


def _summed_log_prob(*args, **kwargs):
    x, log_prob = sampler.ddim_step_with_logprob(*args, **kwargs)
    return x, log_prob * 256  # C*H*W of the check's (4, 8, 8) latents


def _no_constants(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None,
                  generator=None):
    x, log_prob = sampler.ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta,
                                                 prev_sample, generator)
    gap = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar = scheduler.alphas_cumprod
    a_t = abar[timestep].item()
    a_prev = (abar[timestep - gap].item() if timestep - gap >= 0
              else scheduler.final_alpha_cumprod.item())
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return x, log_prob + math.log(sigma) + 0.5 * math.log(2 * math.pi)


def _mean_only(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None,
               generator=None):
    mean = scheduler.step(model_output, timestep, sample, eta=eta,
                          variance_noise=torch.zeros_like(sample)).prev_sample
    _, log_prob = sampler.ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta,
                                                 prev_sample, generator)
    return (mean if prev_sample is None else prev_sample), log_prob


def _undetached_action(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None,
                       generator=None):
    x, log_prob = sampler.ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta,
                                                 prev_sample, generator)
    return x + 0 * model_output, log_prob  # the action now carries the model output's gradient


def _per_element(*args, **kwargs):
    x, log_prob = sampler.ddim_step_with_logprob(*args, **kwargs)
    return x, log_prob[:, None, None, None].expand(x.shape)


@pytest.mark.parametrize("fn, needle", [
    (_summed_log_prob, "summed, not averaged"),
    (_no_constants, "normalising terms"),
    (_mean_only, "you returned the mean"),
    (_undetached_action, "detach it"),
    (_per_element, "average it over C, H, W"),
])  # fmt: skip
def test_logprob_step_diagnoses(fn, needle):
    _fails_with(checks.check_logprob_step, fn, needle)


@pytest.mark.parametrize("fn, needle", [
    (lambda lp, a: (a.detach() * lp).mean(), "sign of the loss is flipped"),
    (lambda lp, a: -(a.detach() * lp).sum(), "summed over the batch"),
    (lambda lp, a: -(a * lp).mean(), "detach them"),
    (lambda lp, a: -(a.detach() * lp), "take the mean"),
    (lambda lp, a: -(a.detach() * lp.exp()).mean(), "not the probability"),
])  # fmt: skip
def test_sf_loss_diagnoses(fn, needle):
    _fails_with(checks.check_sf_loss, fn, needle)


def _clipped(variant: str):
    def fn(log_prob, old_log_prob, advantages, clip_range):
        old = old_log_prob if variant == "undetached" else old_log_prob.detach()
        log_ratio = log_prob - old
        rho = log_ratio.exp()
        clipped = -advantages * rho.clamp(1 - clip_range, 1 + clip_range)
        if variant == "no_max":
            loss = clipped.mean()
        elif variant == "min":
            loss = torch.minimum(-advantages * rho, clipped).mean()
        else:
            loss = torch.maximum(-advantages * rho, clipped).mean()
        kl = (log_ratio.detach() ** 2).mean() * (1.0 if variant == "kl_no_half" else 0.5)
        outside = (rho.detach() - 1).abs() > clip_range
        if variant == "clipfrac_one_side":
            outside = rho.detach() > 1 + clip_range
        return loss, {"approx_kl": kl, "clipfrac": outside.double().mean()}

    return fn


@pytest.mark.parametrize("variant, needle", [
    ("no_max", "forgot the max"),
    ("min", "max and min are swapped"),
    ("undetached", "detach it"),
    ("kl_no_half", "left out the 0.5"),
    ("clipfrac_one_side", "on both sides"),
])  # fmt: skip
def test_clipped_loss_diagnoses(variant, needle):
    _fails_with(checks.check_clipped_loss, _clipped(variant), needle)


def _batch_norm(prompts, rewards):
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


def _per_prompt(f):
    def fn(prompts, rewards):
        arr, out = np.asarray(prompts, dtype=object), np.empty_like(rewards)
        for p in set(prompts):
            idx = np.flatnonzero(arr == p)
            out[idx] = f(rewards[idx])
        return out

    return fn


@pytest.mark.parametrize("fn, needle", [
    (_batch_norm, "whole batch"),
    (_per_prompt(lambda x: (x - x.mean()) / ((x.std(ddof=1) if len(x) > 1 else 0.0) + 1e-6)),
     "ddof=1"),
    (_per_prompt(lambda x: (x - x.mean()) / x.std()), "1e-6"),
    (_per_prompt(lambda x: x - x.mean()), "did not divide"),
])  # fmt: skip
def test_advantage_diagnoses(fn, needle):
    with np.errstate(divide="ignore", invalid="ignore"):
        _fails_with(checks.check_advantages, fn, needle)


def test_clip_diagnoses():
    _fails_with(checks.check_clip_advantages,
                lambda a, m: a.clip(None, m) if isinstance(a, np.ndarray) else a,
                "clip both sides")
