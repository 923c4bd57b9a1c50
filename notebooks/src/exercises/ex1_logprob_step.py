# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # Exercise 1: one DDIM step and its log-probability
#
# Implement the policy of DDPO: one DDIM denoising step, as a Gaussian, with the log-density of the action
# it takes (notebook 2 derives it). For an **epsilon-predicting** scheduler (like Stable Diffusion's), with
# $\bar\alpha_t$ = `scheduler.alphas_cumprod[t]`:
#
# 1. $t_\text{prev} = t - 1000\,/\!/\,T$ (the next timestep on the sampling grid, $T$ = `scheduler.num_inference_steps`);
#    $\bar\alpha_{t-1}$ = `alphas_cumprod[t_prev]`, or `scheduler.final_alpha_cumprod` if $t_\text{prev} < 0$.
# 2. $\sigma_t = \eta\sqrt{\frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\big(1-\frac{\bar\alpha_t}{\bar\alpha_{t-1}}\big)}$
# 3. $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$, with $\hat\varepsilon$ = `model_output`
# 4. $\mu = \sqrt{\bar\alpha_{t-1}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\;\hat\varepsilon$
# 5. If `prev_sample` is None: $x_{t-1} = \mu + \sigma_t z$ with `z = torch.randn(sample.shape, generator=generator)`;
#    otherwise $x_{t-1}$ = `prev_sample` (we *score* a recorded action). Return it detached.
# 6. $\log p = \operatorname{mean}_{C,H,W}\Big[-\frac{(x_{t-1}-\mu)^2}{2\sigma_t^2} - \log\sigma_t - \tfrac12\log 2\pi\Big]$, shape (B,).
#
# `timestep` is a python int here. The self-check compares your function with `sampler.ddim_step_with_logprob`
# on random inputs at three timesteps, sampled and scored, and checks the gradient with respect to
# `model_output`. If something is off, it tells you what.

# %%
import os
import sys
from pathlib import Path

SOLUTION_MODE = os.environ.get("DDPO_SOLUTIONS") == "1"  # CI sets this to run the reference instead of your code
sys.path.insert(0, str(next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "ddpo_min.py").exists())))
sys.path.insert(0, str(Path.cwd()))  # checks.py lives next to this notebook

import math  # noqa: F401  (for your code)

import checks
import torch  # noqa: F401  (for your code)


# %%
def my_ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None, generator=None):
    """Returns (x_{t-1} of shape (B, C, H, W), log_prob of shape (B,))."""
    # YOUR CODE HERE
    raise NotImplementedError


# %%
if SOLUTION_MODE:  # the reference implementation, for CI and for instructors
    from sampler import ddim_step_with_logprob as my_ddim_step_with_logprob

# %%
checks.check_logprob_step(my_ddim_step_with_logprob)

# %% [markdown]
# **When it passes**, look at what you did *not* need: no gradient through the noise, no gradient through
# $\sigma_t$, no gradient through the action. DDPO's gradient reaches the network only through $\mu$.
# Then try it: make your log-prob a *sum* over C, H, W and rerun the check to see the diagnosis, and read
# notebook 2 §2.2 for why the average is used.
