"""The notebooks' checks can fail: each notebook is run with one wrong project function
(tests/notebook_mutants.py), or with one wrong line in a derivation of its own, and must stop at the
check meant to catch that mistake. The run stops at
the first failing cell, so each costs only the cells before that check."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("notebook, mutant, check", [
    ("02_logprob_ddim_step", "mean without -sigma^2",
     "ddim_step_with_logprob == DDIMScheduler.step"),
    ("02_logprob_ddim_step", "log-prob summed", "sampler log-prob == Normal(mu_theta, sigma_t)"),
    ("03_score_function_gradient", "SF loss sign", "gradient of ddpo_sf_loss == analytic"),
    ("04_importance_sampling_clipping", "IS loss min", "zero-gradient regions are exactly"),
    ("05_rwr", "RWR weights unnormalised", "rwr_weights == exp(beta r)/Z"),
    ("06_rewards", "JPEG in bytes", "jpeg_size_kb == Pillow JPEG bytes / 1000"),
    ("01_diffusion_as_mdp", "mean without -sigma^2", "the MDP rebuilt with DDIMScheduler.step"),
    ("02_logprob_ddim_step", "rescored without guidance",
     "rescoring with unchanged weights reproduces the recorded log-probs"),
    ("03_score_function_gradient", "tracker returns raw rewards",
     "per-prompt advantages point uphill far better than raw rewards"),
    ("04_importance_sampling_clipping", "IS ratio inverted",
     "at theta = theta_old, grad ddpo_is_loss == grad ddpo_sf_loss"),
    ("04_importance_sampling_clipping", "guidance ignored",
     "at theta_old: guided rescoring gives rho = 1"),
    ("04_importance_sampling_clipping", "approx_kl without 1/2",
     "approx_kl and clipfrac from ddpo_is_loss == the formulas by hand"),
    ("05_rwr", "diffusion_mse_loss x2", "Eq. 1 == weight_t * diffusion_mse_loss"),
    ("06_rewards", "aesthetic head with a ReLU", "the LAION head has no activations"),
    ("06_rewards", "float images rescaled twice", "clip_preprocess == processor on uint8"),
    ("06_rewards", "BERTScore recall and precision swapped",
     "BERTScore recall and precision by hand == rewards.BERTScorer.score"),
    ("00_ddpo_in_2d", "rescored without guidance",
     "recorded log-probs == rescored == torch.distributions.Normal (averaged over D = 2)"),
    ("00_ddpo_in_2d", "IS ratio inverted",
     "DDPO_IS moves the clouds toward the target, and away from the pretrained policy"),
])  # fmt: skip
def test_a_notebook_check_catches_a_wrong_function(notebook, mutant, check, monkeypatch):
    monkeypatch.setenv("DDPO_MUTANT", mutant)
    path = NOTEBOOKS / f"{notebook}.ipynb"
    _fails_at(nbformat.read(path, as_version=4), path.parent, check, monkeypatch)


# Checks of the notebook's own derivations (a formula written out in a cell, compared with a library
# or a closed form): the mistake goes into the cell itself, in place of its first occurrence.
@pytest.mark.parametrize("notebook, right, wrong, check", [
    ("05_rwr", "a_t = abar[t_int - 1].sqrt() * betas[t_int]",
     "a_t = abar[t_int].sqrt() * betas[t_int]", "a_t, b_t and beta-tilde_t == diffusers'"),
    ("01_diffusion_as_mdp", "img = model.decode(actions[k][b : b + 1])",
     "img = model.decode(actions[k - 1][b : b + 1])", "return of the rebuilt MDP == r(x_0, c)"),
    ("02_logprob_ddim_step", "log_ratio_sum = D * log_ratio_avg", "log_ratio_sum = log_ratio_avg",
     "D * (averaged log-ratio) == exact summed log-ratio"),
    ("04_importance_sampling_clipping",
     "weighted = torch.exp(p.log_prob(x) - q.log_prob(x)) * x**2", "weighted = x**2",
     "importance-weighted average from q == expectation under p"),
    ("04_importance_sampling_clipping", "approx_avg = 0.5 * (delta.mean(1) ** 2).mean().item()",
     "approx_avg = 0.5 * (delta**2).mean().item()", "approx_kl == KL on summed log-probs"),
    ("04_importance_sampling_clipping", "expected = kl_per_dim / D + kl_per_dim**2 / 2",
     "expected = kl_per_dim / D",
     "on the real step, approx_kl == its expectation from the two policies' means"),
    ("05_rwr", "w = w / w.sum()", "w = torch.ones_like(w) / len(w)",
     "RWR's weighted maximum likelihood recovers pi*"),
    ("05_rwr", "a_coef = abar[:-1].sqrt() * betas_s[1:]", "a_coef = abar[1:].sqrt() * betas_s[1:]",
     "a_t x_0 + b_t x_t and beta-tilde_t == diffusers' DDPMScheduler posterior"),
    ("00_ddpo_in_2d", 'weights = r if kind == "raw rewards" else per_label_baseline(r, lab)',
     "weights = r",
     "per-label advantages point along the true gradient better than raw rewards, "
     "at every batch size"),
    ("00_ddpo_in_2d", '"(c) exact ratio": adv[:, None] * torch.exp(2 * log_ratio)',
     '"(c) exact ratio": adv[:, None] * torch.exp(log_ratio)',
     "on stale samples, the exact ratio corrects best, the averaged ratio partly, no ratio least"),
    ("00_ddpo_in_2d", "objective = reward(x).mean() / 2", "objective = -reward(x).mean() / 2",
     "with a differentiable reward, backpropagating through the chain points along g* better "
     "than the score-function estimate from the same batch size"),
    ("05_rwr", "lam = a_coef**2 * pred_weight / (2 * beta_tilde)",
     "lam = a_coef**2 / (2 * beta_tilde)",
     "variational-bound term L_{t-1} == lambda_t * diffusion_mse_loss"),
    ("00_ddpo_in_2d", 'estimates["(d) (b) clipped"].append(gradient(theta_1, -clipped))',
     'estimates["(d) (b) clipped"].append(gradient(theta_1, clipped))',
     "past the clip, the clipped loss's gradient points back toward theta_old"),
    ("06_rewards", "small_clip.vision_model(pixel_values=wrong)",
     "small_clip.vision_model(pixel_values=right)",
     "with floats rescaled twice the score no longer depends on the image"),
])  # fmt: skip
def test_a_notebook_check_catches_a_wrong_derivation(notebook, right, wrong, check, monkeypatch):
    path = NOTEBOOKS / f"{notebook}.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next((c for c in nb.cells if c.cell_type == "code" and right in c.source), None)
    assert cell is not None, f"{right!r} is no longer in {notebook}: update this test"
    cell.source = cell.source.replace(right, wrong, 1)
    _fails_at(nb, path.parent, check, monkeypatch)


def _fails_at(nb, folder: Path, check: str, monkeypatch) -> None:
    """Execute the notebook; it must stop at the check named, and at no other."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("TQDM_DISABLE", "1")
    with pytest.raises(CellExecutionError) as info:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(folder)}}).execute()
    assert f"check failed: {check}" in str(info.value), str(info.value)[-2000:]


# Exercise 6's checks make sure each broken loop shows its symptom. With every mistake taken out
# (the broken version replaced by the correct one), each of the five checks must fail: one run,
# with DDPO_CHECK_RECORD noting each failure instead of stopping at the first.
EX6_MISTAKES_UNDONE = [
    ("return x_prev, log_prob * D", "return x_prev, log_prob",
     "summed log-probs: approx_kl up by > 1000x"),
    ('run("batch-wide advantages", per_prompt_stats=False)', 'run("batch-wide advantages")',
     "batch-wide advantages: they keep the rewards' between-prompt variance"),
    ('mock.patch.object(ddpo_min, "rescore", rescore_without_guidance)',
     'mock.patch.object(ddpo_min, "rescore", real_rescore)',
     "rescoring without guidance: ratios far from 1 before any update"),
    ('mock.patch.object(tiny, "load_tiny", load_with_noisy_last_step)',
     'mock.patch.object(tiny, "load_tiny", load_tiny)',
     "a near-zero sigma_t at the last step: approx_kl up by > 10x"),
    ('run("clip range 1e-6", clip_range=1e-6)', 'run("clip range 1e-6")',
     "clip range 1e-6: all of the second minibatch is clipped"),
]  # fmt: skip


def test_every_failure_mode_check_fails_without_its_mistake(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    path = NOTEBOOKS / "exercises" / "ex6_failure_modes.ipynb"
    nb = nbformat.read(path, as_version=4)
    for right, wrong, _ in EX6_MISTAKES_UNDONE:
        cell = next((c for c in nb.cells if c.cell_type == "code" and right in c.source), None)
        assert cell is not None, f"{right!r} is no longer in exercise 6: update this test"
        cell.source = cell.source.replace(right, wrong)
    record = tmp_path / "failed.txt"
    monkeypatch.setenv("DDPO_CHECK_RECORD", str(record))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    failed = record.read_text().splitlines() if record.exists() else []
    expected = [check for _, _, check in EX6_MISTAKES_UNDONE]
    assert len(failed) == len(expected), failed
    assert all(f.startswith(check) for f, check in zip(failed, expected)), failed
