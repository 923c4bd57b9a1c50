# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # Exercise 7: a KL leash
#
# At tiny scale over-optimisation is fast: after 10 minutes of compressibility the captioner no longer
# recognises a single animal (notebook 7). The paper lists over-optimisation as an open problem; the usual
# remedy in RL fine-tuning is to penalise the divergence from the pretrained model, as DPOK does for
# diffusion models (Fan et al., arXiv 2305.16381). The objective becomes
#
# $$J_\beta(\theta) = \mathbb E\big[r(x_0, c)\big] - \beta\,\mathrm{KL}\big(p_\theta(x_{0:T}\mid c)\,\big\|\,p_\text{pre}(x_{0:T}\mid c)\big)
#   = \mathbb E\big[r(x_0, c)\big] - \beta \sum_{t} \mathbb E_{x_t\sim p_\theta}\big[\mathrm{KL}_t\big],$$
#
# by the chain rule of the KL for two Markov chains with the same start, where $\mathrm{KL}_t$ is the KL of one
# step, $p_\theta(x_{t-1}\mid x_t, c)$ against $p_\text{pre}(x_{t-1}\mid x_t, c)$. Both steps are Gaussians with the
# *same* $\sigma_t$ (Eq. 2; only the network differs), so the KL of one step is a function of the two means:
#
# $$\mathrm{KL}_t = \frac{\|\mu_\theta(x_t, t, c) - \mu_\text{pre}(x_t, t, c)\|^2}{2\sigma_t^2},$$
#
# averaged over the $D = C\cdot H\cdot W$ coordinates, as the loop averages its log-probabilities.
# `ddpo_min.py` adds $\beta\,\mathrm{KL}_t$ to the loss of every trained transition when `--kl-coef` $\beta > 0$
# (`rescore_with_kl`); $\mu_\text{pre}$ comes from one more guided UNet call without gradient. What the loop
# optimises is an approximation of $J_\beta$, as in DPOK: the reward term is DDPO's clipped surrogate on the
# advantage $A$ (a standardised reward, so $\beta$ is in units of the rewards' per-prompt spread, not of the
# reward), and the penalty is taken at the stored states $x_t$, sampled by $\theta_\text{old}$: its gradient flows
# through $\mu_\theta$ only, not through how the states' distribution depends on $\theta$.
#
# **Part A** (practice, not graded: the project's own version, `sampler.gaussian_kl`, is in the package you
# were given; write yours before you look). Implement `my_gaussian_kl(mean, mean_pre, sigma)`: `mean` and
# `mean_pre` of shape $(B, C, H, W)$, `sigma` of shape $(B,)$ (one $\sigma_t$ per sample), returning the $(B,)$
# per-step KLs. Gradient must flow into `mean`; `mean_pre` comes from a forward pass without gradient.
#
# **Part B.** The loop with your KL, for three values of $\beta$ (about 3 minutes each on 2 cores): how far each
# run moves the held-out JPEG size, and what it leaves of the animals.
#
# **Part C** (in your report). What does $\beta$ buy, in numbers from your runs? Where on the curve would you
# stop, and what would you need to measure to choose $\beta$ for a real model?

# %%
import os
import sys
from pathlib import Path

SOLUTION_MODE = os.environ.get("DDPO_SOLUTIONS") == "1"  # CI sets this to run the reference instead of your code
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "ddpo_min.py").exists())
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "notebooks"))
sys.path.insert(0, str(Path.cwd()))  # checks.py lives next to this notebook

import checks
import nbutils
import torch


# %%
def my_gaussian_kl(mean: torch.Tensor, mean_pre: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # YOUR CODE HERE
    raise NotImplementedError


# %%
if SOLUTION_MODE:  # the reference implementation, for CI and for instructors
    import sampler

    my_gaussian_kl = sampler.gaussian_kl

# %%
checks.check_gaussian_kl(my_gaussian_kl)

# %% [markdown]
# ## Part B: the leash in the loop
#
# Each run is the tiny defaults (DDPO$_\text{IS}$ on compressibility) with `kl_coef` $= \beta$, your KL in place
# of the project's, for 8 epochs; before and after, exercise 5's fixed held-out set (the 45 animals x 2 noise
# seeds) gives the JPEG size and the captioner's top-1.

# %%
from tools import ex7

settings = dict(epochs=ex7.EPOCHS)

# %%
if SOLUTION_MODE:  # CI: one short epoch per beta (the figure shows the harness; the leash already holds)
    settings = dict(epochs=1, sample_batch_size=16, sample_batches=1, samples_per_prompt=8,
                    train_batch_size=8, minibatches=2, kl_samples=2, grid_size=4)

# %%
runs = []
for beta in ex7.BETAS:
    runs.append(ex7.train_leashed(ROOT / "runs" / f"ex7-beta{beta:g}", beta, my_gaussian_kl, **settings))
    nbutils.restore_inline_plots()
    r = runs[-1]
    print(f"beta {beta:g}: held-out JPEG {r['jpeg_change_percent']:+.1f}%, captioner top-1 "
          f"{r['top1_before']:.0f}% -> {r['top1_after']:.0f}%, KL to the pretrained policy {r['kl_pretrained'][-1]:.2e}")

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for r in runs:
    axes[0].scatter(-r["jpeg_change_percent"], r["top1_after"], s=40, label=f"beta = {r['beta']:g}")
    axes[1].plot(r["kl_pretrained"], "o-", label=f"beta = {r['beta']:g}")
axes[0].axhline(runs[0]["top1_before"], color="k", lw=0.6, ls="--", label="pretrained")
axes[0].set(xlabel="held-out JPEG size reduction (%)", ylabel="captioner top-1 (%)", title="reward against recognisability")
axes[1].set(xlabel="epoch", ylabel="KL per step and coordinate", yscale="log", title="KL to the pretrained policy")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

nbutils.check(runs[-1]["kl_pretrained"][-1] < runs[0]["kl_pretrained"][-1],
              "the strongest leash keeps the policy nearer the pretrained one than beta = 0")
