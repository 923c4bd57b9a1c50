# ruff: noqa: E402, E501
# (a notebook source: imports follow the setup cell; markdown tables and LaTeX lines do not wrap)
# %% [markdown]
# # Exercise 4: advantages, normalised per prompt
#
# Raw rewards make a noisy gradient: they carry a large common offset, and an offset per prompt (some
# animals are easier to compress than others). DDPO normalises each reward with the statistics of its own
# prompt (notebook 3 §3.2):
#
# $$A_b = \frac{r_b - \operatorname{mean}\{r_k : c_k = c_b\}}{\operatorname{std}\{r_k : c_k = c_b\} + 10^{-6}}$$
#
# with the population standard deviation (`np.std`'s default), and then clips the result to $[-5, 5]$.
#
# **Part A.** `my_advantages(prompts, rewards)`: `prompts` is a list of B strings, `rewards` a numpy array
# (B,); return a numpy array (B,) in the order of the inputs, with the statistics of each prompt computed
# **within this batch**. (The project's `PerPromptStatTracker` does the same with a buffer of recent rewards
# per prompt across epochs, and falls back to batch statistics for prompts seen fewer times than
# `--stat-min-count`: 8 and 8 at the tiny defaults, where a buffer holds exactly the current epoch's 8
# samples of a prompt, so the loop computes what you compute here; 32 and 16 in the paper's aesthetic
# recipe.)
#
# **Part B.** `my_clip_advantages(advantages, max_abs)`: clip to $[-\text{max\_abs}, \text{max\_abs}]$, for
# numpy arrays and torch tensors alike.

# %%
import os
import sys
from pathlib import Path

SOLUTION_MODE = os.environ.get("DDPO_SOLUTIONS") == "1"  # CI sets this to run the reference instead of your code
sys.path.insert(0, str(next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "ddpo_min.py").exists())))
sys.path.insert(0, str(Path.cwd()))  # checks.py lives next to this notebook

import checks
import numpy as np

prompts, rewards = checks.advantage_inputs()  # the check's inputs, to try things on
for p, r in zip(prompts, rewards):
    print(f"{p:8s} {r:8.3f}")

# %%
def my_advantages(prompts: list[str], rewards: np.ndarray) -> np.ndarray:
    # YOUR CODE HERE
    raise NotImplementedError


def my_clip_advantages(advantages, max_abs: float = 5.0):
    # YOUR CODE HERE
    raise NotImplementedError


# %%
if SOLUTION_MODE:  # the reference implementations, for CI and for instructors
    from ddpo_min import clip_advantages as my_clip_advantages

    my_advantages = checks.reference_batch_advantages  # PerPromptStatTracker with min_count=1, fresh per batch

# %%
checks.check_advantages(my_advantages)
checks.check_clip_advantages(my_clip_advantages)

# %% [markdown]
# **Think about it.** In the check's data, 'a frog' got the same reward three times. What advantage does
# each of those samples get, and what does that mean for the gradient? Why might that be the right thing
# when a prompt's samples are all equally good?

# %% [markdown]
# **Then copy `my_advantages` and `my_clip_advantages` into `my_ddpo.py`** (beside this notebook), unchanged: exercises 5 and 6 train with it
# from there, and that file is what you submit.
