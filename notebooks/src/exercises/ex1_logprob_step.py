# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # Exercise 1: one DDIM step and its log-probability
#
# Implement the policy of DDPO: one DDIM denoising step, as a Gaussian, with the log-density of the action
# it takes (notebook 2 derives it). Your function must work for two schedulers: Stable Diffusion's, whose
# network predicts the noise $\varepsilon$, and the tiny model's, which exercise 5 trains: it predicts
# $v$, clips $\hat x_0$ to the pixel range, and its last step is deterministic. With
# $\bar\alpha_t$ = `scheduler.alphas_cumprod[t]` and the settings in `scheduler.config`:
#
# 1. $t_\text{prev} = t - N\,/\!/\,T$ (the next timestep on the sampling grid; $N$ =
#    `scheduler.config.num_train_timesteps`, 1000 here, and $T$ = `scheduler.num_inference_steps`);
#    $\bar\alpha_{t-1}$ = `alphas_cumprod[t_prev]`, or `scheduler.final_alpha_cumprod` if $t_\text{prev} < 0$.
# 2. $\sigma_t = \eta\sqrt{\frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\big(1-\frac{\bar\alpha_t}{\bar\alpha_{t-1}}\big)}$
# 3. $\hat x_0$ and $\hat\varepsilon$ from `model_output`, by `scheduler.config.prediction_type`:
#    - `"epsilon"` (Stable Diffusion): $\hat\varepsilon$ = `model_output`, $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$;
#    - `"v_prediction"` (the tiny model), with $\hat v$ = `model_output`: $\hat x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,\hat v$
#      and $\hat\varepsilon = \sqrt{\bar\alpha_t}\,\hat v + \sqrt{1-\bar\alpha_t}\,x_t$.
#
#    Then, if `scheduler.config.clip_sample` is true, clamp $\hat x_0$ to $[-r, r]$ with $r$ = `clip_sample_range`
#    (`torch.clamp`); $\hat\varepsilon$ stays as computed.
# 4. $\mu = \sqrt{\bar\alpha_{t-1}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\;\hat\varepsilon$
# 5. If `prev_sample` is None: $x_{t-1} = \mu + \sigma_t z$ with `z = torch.randn(sample.shape, generator=generator)`;
#    otherwise $x_{t-1}$ = `prev_sample` (we *score* a recorded action). Return it detached.
# 6. $\log p = \operatorname{mean}_{C,H,W}\Big[-\frac{(x_{t-1}-\mu)^2}{2\sigma_t^2} - \log\sigma_t - \tfrac12\log 2\pi\Big]$, shape (B,).
#    Where $\sigma_t = 0$ (the tiny model's last step: `final_alpha_cumprod` is 1 there, so $\bar\alpha_{t-1} = 1$)
#    the step is deterministic, $x_{t-1} = \mu$, and it has no density: return a log-prob of 0 for
#    every sample (`torch.zeros(B)`). The training loop never trains on that step.
#
# `timestep` is a python int here. The self-check compares your function with `sampler.ddim_step_with_logprob`
# on random inputs at seven timesteps, four on Stable Diffusion's scheduler and three on the tiny model's,
# sampled and scored, and checks the gradient with respect to `model_output` on both. If something is
# off, it tells you what.

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

# %% [markdown]
# **Then copy `my_ddim_step_with_logprob` into `my_ddpo.py`** (beside this notebook), unchanged: exercises 5 and 6 train with it
# from there, and that file is what you submit.
