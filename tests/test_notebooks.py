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
import tiny  # noqa: E402


def test_notebooks_are_built_from_their_sources():
    assert build_notebooks.main(["--check"]) == 0, (
        "run `python notebooks/build_notebooks.py`, commit the .ipynb")


def test_an_executed_copy_showing_changed_code_is_stale():
    """The staleness check reads the project code an executed notebook displays and compares it
    with the file at the line shown."""
    nb = nbformat.read(NOTEBOOKS / "executed" / "05_rwr.ipynb", as_version=4)
    shown = [o for c in nb.cells for o in c.get("outputs", [])
             if build_notebooks.SHOWN.match(o.get("data", {}).get("text/markdown", ""))]
    assert shown and not build_notebooks.shown_code_changed(nb)
    shown[0]["data"]["text/markdown"] = shown[0]["data"]["text/markdown"].replace("def ", "def  ")
    assert build_notebooks.shown_code_changed(nb)


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
    checks.check_gaussian_kl(sampler.gaussian_kl)
    checks.check_clipped_loss(ddpo_min.ddpo_is_loss)
    checks.check_advantages(checks.reference_batch_advantages)
    checks.check_clip_advantages(ddpo_min.clip_advantages)
    assert capsys.readouterr().out.count("match: True") == 6


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
    # the unbiased std as numpy and torch write it: NaN for the one-sample prompt alone
    (_per_prompt(lambda x: (x - x.mean()) / (x.std(ddof=1) + 1e-6)), "the unbiased std"),
    (_per_prompt(lambda x: ((t := torch.as_tensor(x)) - t.mean()).div(t.std() + 1e-6).numpy()),
     "the unbiased std"),
])  # fmt: skip
def test_advantage_diagnoses(fn, needle):
    with np.errstate(divide="ignore", invalid="ignore"):
        _fails_with(checks.check_advantages, fn, needle)


def test_clip_diagnoses():
    _fails_with(checks.check_clip_advantages,
                lambda a, m: a.clip(None, m) if isinstance(a, np.ndarray) else a,
                "clip both sides")


# --------------------------------------------------------------------------------------------------
# Every diagnosis fires on the mistake it names (mutation tests): a student's implementation,
# written independently of the reference, with one mistake at a time
# --------------------------------------------------------------------------------------------------


def _student_step(mistake: str = ""):
    """Exercise 1 written out from its text (the DDIM equations, for an epsilon- or v-predicting
    scheduler, with clipping and a deterministic last step), with one named mistake (or none).
    "sd only" is a step written for Stable Diffusion's scheduler alone: epsilon prediction, no
    clipping, no case for sigma_t = 0 (what exercise 1 once asked for)."""
    sd_only = mistake == "sd only"

    def fn(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None, generator=None):
        config = scheduler.config
        gap = config.num_train_timesteps // scheduler.num_inference_steps
        abar, final = scheduler.alphas_cumprod.double(), scheduler.final_alpha_cumprod.double()
        t = int(timestep)
        t_prev = t - 1 if mistake in ("t-1", "t-1 both") else t - gap
        a_t = abar[t]
        a_prev = abar[t_prev] if (t_prev >= 0 or mistake == "wrapped index") else final
        a_sig = a_prev if mistake != "t-1" else (abar[t - gap] if t - gap >= 0 else final)
        sigma = (1.0 if mistake == "eta ignored" else eta) * torch.sqrt(
            (1 - a_sig) / (1 - a_t) * (1 - a_t / a_sig))
        out, x = model_output.double(), sample.double()
        if config.prediction_type == "v_prediction" and not (sd_only or mistake == "as epsilon"):
            x0_hat = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        else:
            eps = out
            x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if config.clip_sample and not (sd_only or mistake == "no clip"):
            r = config.clip_sample_range
            x0_hat = x0_hat.clamp(-r, r)
            if mistake == "eps from clipped":
                eps = (x - a_t.sqrt() * x0_hat) / (1 - a_t).sqrt()
        direction = (1 - a_prev - (0.0 if mistake == "direction" else sigma**2)).clamp(min=0).sqrt()
        mean = a_prev.sqrt() * x0_hat + direction * eps
        if mean.requires_grad and mistake == "detached mean":
            mean = mean.detach()
        if prev_sample is None or mistake == "resampled":
            gen = torch.Generator().manual_seed(999) if mistake == "other noise" else generator
            z = torch.randn(sample.shape, generator=gen).double()
            scale = sigma**2 if mistake == "variance noise" else sigma
            prev_sample = mean if mistake == "mean only" else mean + scale * z
        x_prev = prev_sample if mistake == "undetached" else prev_sample.detach()
        if sigma == 0 and not (sd_only or mistake == "divides by zero"):
            return x_prev.float(), torch.zeros(sample.shape[0])  # deterministic: no density
        std = sigma**2 if mistake == "variance density" else sigma
        half = 1.0 if mistake == "no half" else 0.5
        log_prob = -half * (x_prev.double() - mean) ** 2 / std**2
        if mistake != "no constants":
            log_prob = log_prob - torch.log(std) - 0.5 * math.log(2 * math.pi)
        if mistake == "sign":
            log_prob = -log_prob
        if mistake == "summed":
            log_prob = log_prob.sum(dim=(1, 2, 3))
        elif mistake != "per element":
            log_prob = log_prob.mean(dim=(1, 2, 3))
        if mistake == "scalar":
            log_prob = log_prob.mean()
        return x_prev.float(), log_prob.float()

    return fn


def test_the_tiny_scheduler_of_the_checks_is_the_tiny_models():
    assert checks.TINY_SCHEDULER_CONFIG == tiny.SCHEDULER_CONFIG
    assert dict(checks.tiny_scheduler().config) == dict(tiny.make_scheduler().config)


def test_the_independent_student_step_passes(capsys):
    checks.check_logprob_step(_student_step())
    assert "match: True" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, needle", [
    ("t-1", "not t - 1"),
    ("t-1 both", "not t - 1"),
    ("wrapped index", "final_alpha_cumprod"),
    ("eta ignored", "eta is ignored"),
    ("direction", "left out -sigma_t^2"),
    ("variance noise", "you added sigma_t^2 * z"),
    ("mean only", "you returned the mean"),
    ("other noise", "not the reference's noise"),
    ("variance density", "the variance sigma_t^2 where the standard deviation"),
    ("no half", "missing its 1/2"),
    ("no constants", "normalising terms"),
    ("sign", "sign is flipped"),
    ("summed", "summed, not averaged"),
    ("per element", "average it over C, H, W"),
    ("scalar", "log_prob is a scalar"),
    ("resampled", "return it unchanged"),
    ("undetached", "detach it"),
    ("detached mean", "log_prob has no gradient"),
    ("sd only", "the model output is v"),
    ("as epsilon", "you read it as epsilon)"),
    ("no clip", "x̂_0 is not clipped"),
    ("eps from clipped", "recomputed it from the clipped"),
    ("divides by zero", "must be 0 for every sample here"),
])  # fmt: skip
def test_every_logprob_step_diagnosis_fires(mistake, needle):
    _fails_with(checks.check_logprob_step, _student_step(mistake), needle)


@pytest.mark.parametrize("fn, needle", [
    (lambda lp, a: -(a.detach().mean() * lp.mean()), "mean of the products"),
    (lambda lp, a: float(-(a.detach() * lp).mean()), "return a torch tensor"),
])  # fmt: skip
def test_more_sf_loss_diagnoses(fn, needle):
    _fails_with(checks.check_sf_loss, fn, needle)


def _is_loss(variant: str):
    """Exercise 3 written out, with one named mistake."""

    def fn(log_prob, old_log_prob, advantages, clip_range):
        log_ratio = log_prob - old_log_prob.detach()
        rho = 1 / log_ratio.exp() if variant == "inverted" else log_ratio.exp()
        if variant == "log-ratio":
            rho = log_ratio
        a = advantages
        unclipped = -a * rho
        clipped = -a * rho.clamp(1 - clip_range, 1 + clip_range)
        if variant == "advantages clipped":
            clipped = -a.clamp(1 - clip_range, 1 + clip_range) * rho
        loss = torch.maximum(unclipped, clipped).mean()
        if variant == "no clipping":
            loss = unclipped.mean()
        if variant == "sign":
            loss = -loss
        if variant == "per sample":
            loss = torch.maximum(unclipped, clipped)
        lr, r = log_ratio.detach(), log_ratio.detach().exp()
        kl = {"kl squared mean": 0.5 * lr.mean() ** 2, "kl rho": 0.5 * ((r - 1) ** 2).mean(),
              "kl mean": lr.mean(), "kl k1": (-lr).mean()}.get(variant, 0.5 * (lr**2).mean())
        frac = {"clipfrac count": ((r - 1).abs() > clip_range).double().sum(),
                "clipfrac complement": ((r - 1).abs() <= clip_range).double().mean()}.get(
            variant, ((r - 1).abs() > clip_range).double().mean())
        if variant == "undetached diagnostics":
            kl = 0.5 * (log_ratio**2).mean()
        info = {"approx_kl": kl, "clipfrac": frac}
        if variant == "no clipfrac":
            del info["clipfrac"]
        return (loss, info) if variant != "no tuple" else loss

    return fn


def test_the_independent_student_clipped_loss_passes(capsys):
    checks.check_clipped_loss(_is_loss(""))
    assert "match: True" in capsys.readouterr().out


@pytest.mark.parametrize("variant, needle", [
    ("inverted", "yours is inverted"),
    ("log-ratio", "not the log-ratio itself"),
    ("advantages clipped", "clip the ratio, not the advantages"),
    ("no clipping", "there is no clipping"),
    ("sign", "sign of the loss is flipped"),
    ("per sample", "must be a scalar"),
    ("kl squared mean", "a mean of squares"),
    ("kl rho", "not rho - 1"),
    ("kl mean", "is not a KL estimate"),
    ("kl k1", "k1 estimator"),
    ("clipfrac count", "not a count"),
    ("clipfrac complement", "OUTSIDE"),
    ("undetached diagnostics", "detach it"),
    ("no clipfrac", 'no "clipfrac"'),
    ("no tuple", "return (loss"),
])  # fmt: skip
def test_every_clipped_loss_diagnosis_fires(variant, needle):
    _fails_with(checks.check_clipped_loss, _is_loss(variant), needle)


def _grouped_order(prompts, rewards):
    arr = np.asarray(prompts, dtype=object)
    ref = checks.reference_batch_advantages(prompts, rewards)
    return np.concatenate([ref[np.flatnonzero(arr == p)] for p in dict.fromkeys(prompts)])


@pytest.mark.parametrize("fn, needle", [
    (_per_prompt(lambda x: (x - x.mean()) / (x.var() + 1e-6)), "not the variance"),
    (_per_prompt(lambda x: x / (x.std() + 1e-6)), "did not subtract the mean"),
    (_grouped_order, "order of the input rewards"),
    (lambda prompts, rewards: checks.reference_batch_advantages(prompts, rewards)[:-1],
     "one advantage per sample"),
])  # fmt: skip
def test_more_advantage_diagnoses(fn, needle):
    _fails_with(checks.check_advantages, fn, needle)


@pytest.mark.parametrize("fn, needle", [
    (lambda a, m: a / np.abs(a).max() * m if isinstance(a, np.ndarray) else a, "do not rescale"),
    (lambda a, m: np.clip(np.abs(a), 0, m) if isinstance(a, np.ndarray) else a, "keeps the sign"),
    (lambda a, m: np.clip(np.asarray(a), -m, m), "also work on torch tensors"),
])  # fmt: skip
def test_more_clip_diagnoses(fn, needle):
    _fails_with(checks.check_clip_advantages, fn, needle)


def _student_kl(mistake: str = ""):
    """Exercise 7's per-step KL, written from its text (not sampler.py), with one mistake."""
    def kl(mean, mean_pre, sigma):
        s = sigma if mistake == "sigma (B,) against W" else sigma.reshape(-1, 1, 1, 1)
        var = s if mistake == "sigma not squared" else s**2
        half = 1.0 if mistake == "no 1/2" else 0.5
        if mistake == "detached":
            mean = mean.detach()
        per = half * (mean - mean_pre) ** 2 / var
        if mistake == "summed":
            return per.sum(dim=(1, 2, 3))
        if mistake == "batch mean":
            return per.mean().expand(len(mean))
        out = per.mean(dim=(1, 2, 3))
        return out + torch.log(sigma) if mistake == "log term" else out

    return kl


def test_the_independent_student_kl_passes(capsys):
    checks.check_gaussian_kl(_student_kl())
    assert "match: True" in capsys.readouterr().out


@pytest.mark.parametrize("mistake, needle", [
    ("no 1/2", "missing the 1/2"),
    ("sigma not squared", "not sigma_t (a variance"),
    ("summed", "do not sum"),
    ("batch mean", "not over the batch too"),
    ("log term", "no log term here"),
    ("detached", "keep mean_theta in the graph"),
    ("sigma (B,) against W", "shape (B, 1, 1, 1)"),
])  # fmt: skip
def test_every_kl_diagnosis_fires(mistake, needle):
    _fails_with(checks.check_gaussian_kl, _student_kl(mistake), needle)
