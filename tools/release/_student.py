"""The student release's link from the package to your code: the graded functions of sampler.py
and ddpo_min.py (left out of this release) call the functions you wrote in exercises 1-4, from
notebooks/exercises/my_ddpo.py. Everything else in the package is the project's own code.

(Instructors: this file exists only in the release that `python -m tools.student_copy` builds.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

MY_DDPO = Path(__file__).resolve().parent / "notebooks" / "exercises" / "my_ddpo.py"


def mine():
    """The module my_ddpo, loaded once (the notebooks that `import my_ddpo` share it)."""
    if "my_ddpo" not in sys.modules:
        spec = importlib.util.spec_from_file_location("my_ddpo", MY_DDPO)
        module = importlib.util.module_from_spec(spec)
        sys.modules["my_ddpo"] = module
        spec.loader.exec_module(module)
    return sys.modules["my_ddpo"]


def step(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None, generator=None):
    """Your exercise 1 step, called once per sample: the loop passes per-sample timesteps and one
    generator per sample, exercise 1 takes an int timestep and one generator."""
    from tools.ex5 import per_sample

    return per_sample(mine().my_ddim_step_with_logprob)(
        scheduler, model_output, timestep, sample, eta=eta, prev_sample=prev_sample,
        generator=generator)


def step_mean(scheduler, model_output, timestep, sample, eta):
    """The policy's mean mu and sigma_t, (B, C, H, W) and (B,), read off your step: sampled twice
    with known noise z_a and z_b, x_a = mu + sigma z_a and x_b = mu + sigma z_b give sigma_t by
    least squares and then mu. (The project computes them in closed form, which is exercise 1's
    answer.)

    Your step returns x_{t-1} without gradient, so mu's gradient is rebuilt: each coordinate of mu
    depends on the same coordinate of the model output alone (x̂_0, eps and mu are elementwise), so
    one more step with the output shifted by h gives d mu / d output coordinate by coordinate, and
    mu + (d mu / d output) * (output - output.detach()) has mu's value and its gradient. The KL
    leash (--kl-coef, exercise 7) trains through it; the KL diagnostic and the list of stochastic
    steps call this without gradient and skip that step."""
    mean, sigma = _mean_and_sigma(scheduler, model_output, timestep, sample, eta)
    if torch.is_grad_enabled() and model_output.requires_grad:
        h = 1e-4
        shifted, _ = _mean_and_sigma(scheduler, model_output.detach() + h, timestep, sample, eta)
        slope = ((shifted - mean) / h).to(model_output.device)  # d mu / d output, elementwise
        mean = mean + slope * (model_output.float() - model_output.float().detach())
    return mean, sigma


def _mean_and_sigma(scheduler, model_output, timestep, sample, eta):
    """mu and sigma_t from two draws of your step with known noise (values only)."""
    batch, shape = sample.shape[0], (1,) + tuple(sample.shape[1:])
    draws = []
    for seed in (1, 2):
        z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        gens = [torch.Generator().manual_seed(seed) for _ in range(batch)]
        with torch.no_grad():
            x, _ = step(scheduler, model_output, timestep, sample, eta=eta, generator=gens)
        draws.append((x.float().cpu(), z))
    (x_a, z_a), (x_b, z_b) = draws
    dz = (z_a - z_b).flatten()
    sigma = (x_a - x_b).flatten(1) @ dz / (dz @ dz)  # (B,)
    sigma = torch.where(sigma.abs() < 1e-7, torch.zeros_like(sigma), sigma)  # float32 rounding
    mean = x_a - sigma.view((-1,) + (1,) * (sample.ndim - 1)) * z_a
    return mean.to(sample.device), sigma.to(sample.device)
