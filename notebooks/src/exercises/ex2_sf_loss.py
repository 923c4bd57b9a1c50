# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # Exercise 2: the score-function (REINFORCE) loss
#
# DDPO$_\text{SF}$ estimates $\nabla_\theta\,\mathbb E[r] = \mathbb E\big[\sum_t \nabla_\theta\log p_\theta(x_{t-1}\mid x_t,c)\,r\big]$
# (notebook 3), with the reward $r$ replaced by an advantage $A$ (which changes the estimate's variance, and
# its scale by a positive factor per prompt: notebook 3, §3.2). Autograd needs a *loss* whose gradient is minus that estimate, for one denoising step and a
# batch of $B$ transitions:
#
# $$\mathcal L = -\frac1B\sum_b A_b\,\log p_\theta\big(x^{(b)}_{t-1}\mid x^{(b)}_t, c_b\big).$$
#
# The advantages $A$ are data: no gradient may flow into them. Implement `my_sf_loss(log_prob, advantages)`:
# both are tensors of shape (B,), `log_prob` carries gradient, and the result is a scalar.

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
def my_sf_loss(log_prob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    # YOUR CODE HERE
    raise NotImplementedError


# %%
if SOLUTION_MODE:  # the reference implementation, for CI and for instructors
    from ddpo_min import ddpo_sf_loss as my_sf_loss

# %%
checks.check_sf_loss(my_sf_loss)

# %% [markdown]
# **Think about it.** Your loss's *value* means nothing: it is not the expected reward and it does not go
# down as training goes well (the advantages are re-normalised every epoch). Only its gradient at the
# current parameters matters. Why is it wrong to use it for more than one optimizer step on the same batch?
# (Exercise 3 and notebook 4.)

# %% [markdown]
# **Then copy `my_sf_loss` into `my_ddpo.py`** (beside this notebook), unchanged: that file is what you
# submit, and the autograder grades it there (exercises 5 and 6 train with DDPO$_\text{IS}$, so they do not
# use it).
