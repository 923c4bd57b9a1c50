# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # Exercise 3: the clipped importance-sampling loss (DDPO$_\text{IS}$)
#
# To take several optimizer steps on one batch, DDPO$_\text{IS}$ reweights each transition by the ratio of
# the current to the sampling policy and clips that ratio, PPO-style (notebook 4):
#
# $$\rho = \exp\big(\log p_\theta - \log p_{\theta_\text{old}}\big),\qquad
#   \mathcal L = \frac1B\sum_b \max\big(-A_b\,\rho_b,\ -A_b\,\operatorname{clip}(\rho_b, 1-\epsilon, 1+\epsilon)\big).$$
#
# Also return the two diagnostics the training loop logs, both detached:
# `approx_kl` $= \tfrac12\,\operatorname{mean}\big((\log p_\theta - \log p_{\theta_\text{old}})^2\big)$ and
# `clipfrac` $= \operatorname{mean}\big(\mathbb 1[|\rho - 1| > \epsilon]\big)$.
#
# Implement `my_clipped_loss(log_prob, old_log_prob, advantages, clip_range)` returning
# `(loss, {"approx_kl": ..., "clipfrac": ...})`. Only `log_prob` may carry gradient into the loss.

# %%
import os
import sys
from pathlib import Path

SOLUTION_MODE = os.environ.get("DDPO_SOLUTIONS") == "1"  # CI sets this to run the reference instead of your code
sys.path.insert(0, str(next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "ddpo_min.py").exists())))
sys.path.insert(0, str(Path.cwd()))  # checks.py lives next to this notebook

import checks
import torch


# %%
def my_clipped_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    # YOUR CODE HERE
    raise NotImplementedError


# %%
if SOLUTION_MODE:  # the reference implementation, for CI and for instructors
    from ddpo_min import ddpo_is_loss as my_clipped_loss

# %%
checks.check_clipped_loss(my_clipped_loss)

# %% [markdown]
# **Think about it.** For a sample with $A > 0$ whose ratio has dropped to $\rho < 1-\epsilon$ (the update
# made it *less* likely), does your loss still push it up? And for $A > 0$, $\rho > 1+\epsilon$? Check your
# answer against the table in notebook 4 §4.3.

# %% [markdown]
# **Then copy `my_clipped_loss` into `my_ddpo.py`** (beside this notebook), unchanged: exercises 5 and 6 train with it
# from there, and that file is what you submit.
