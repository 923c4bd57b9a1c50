"""Your functions from exercises 1-4 and 7, in one file: exercise 5 trains with them, exercise 6
breaks the loop around them, exercise 7 leashes it, and the autograder (`python -m tools.autograde`)
runs them on inputs you have not seen. When an exercise's check passes in its notebook, copy the
function here, unchanged.

Each body below is a placeholder. Keep the names and signatures; import what you need at the top.
"""

from __future__ import annotations

import math  # noqa: F401  (for your code)

import numpy as np
import torch


def my_ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None,
                              generator=None):
    """Exercise 1: returns (x_{t-1} of shape (B, C, H, W), log_prob of shape (B,))."""
    raise NotImplementedError("exercise 1: copy your function here")


def my_sf_loss(log_prob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Exercise 2: the score-function loss, a scalar."""
    raise NotImplementedError("exercise 2: copy your function here")


def my_clipped_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Exercise 3: (loss, {"approx_kl": ..., "clipfrac": ...})."""
    raise NotImplementedError("exercise 3: copy your function here")


def my_advantages(prompts: list[str], rewards: np.ndarray) -> np.ndarray:
    """Exercise 4, part A: per-prompt normalised advantages, in the order of the inputs."""
    raise NotImplementedError("exercise 4: copy your function here")


def my_clip_advantages(advantages, max_abs: float = 5.0):
    """Exercise 4, part B: advantages clipped to [-max_abs, max_abs], numpy or torch."""
    raise NotImplementedError("exercise 4: copy your function here")


def my_gaussian_kl(mean: torch.Tensor, mean_pre: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exercise 7: KL(N(mean, sigma^2 I) || N(mean_pre, sigma^2 I)) per sample, averaged over
    C, H, W, shape (B,)."""
    raise NotImplementedError("exercise 7: copy your function here")
